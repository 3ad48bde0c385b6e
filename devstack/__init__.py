"""The development stack: every process the project starts outside production.

`processes` picks free ports, starts children in their own process groups, waits for them
and stops them; `servers` knows each server's command line (Redis single, Cluster and
Sentinel, the sample backend, the proxy); `stack` starts a whole set for the demo and the
load tests; `demo` is `idempotency-proxy demo`. The tests (tests/harness.py), the benchmark
(scripts/bench.py) and the load tests (loadtests/smoke.py) all start their processes here.
Not part of the request path: nothing in `proxy/` imports it.
"""
