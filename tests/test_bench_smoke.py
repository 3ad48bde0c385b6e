"""`scripts/bench.py --quick` runs end to end and prints its comparisons.

The benchmark starts its own Redis, backend and proxy, drives every scenario once
for a second, and checks every answer and the backend's ledger itself (exit 1 on
an error status or an unexpected execution count). Never asserts on the numbers:
this machine is shared and noisy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from harness import REPO_ROOT, redis_binaries_missing

BENCH = REPO_ROOT / "scripts" / "bench.py"
TIMEOUT_S = 40


@pytest.mark.skipif(bool(redis_binaries_missing("redis-server")), reason="needs redis-server")
def test_quick_bench_exits_cleanly_and_prints_the_ratio_lines() -> None:
    env = dict(os.environ, NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    done = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, f"exit {done.returncode}\n{out}\n{done.stderr[-3000:]}"
    for path in ("miss", "replay", "storm"):
        for connections in (1, 32):
            pattern = rf"^ratio {path}/direct\s+c={connections}\s+\d+\.\d+x"
            assert re.search(pattern, out, re.MULTILINE), f"no {path} c={connections} ratio\n{out}"
    # The targets carry a verdict, whatever it is: the proxy's own CPU per request (from
    # /proc), the added latency at one connection, the memory.
    assert re.search(
        r"^proxy CPU per request, miss c=32  \d+ us  target <= 600 us  (PASS|MISS)$", out, re.M
    )
    assert re.search(
        r"^proxy CPU per request, replay c=32  \d+ us  target <= 120 us  (PASS|MISS)$", out, re.M
    )
    assert re.search(
        r"^added p50 at c=1 \(miss - direct\) .*target <= 0\.8 ms\s+(PASS|MISS)$", out, re.M
    )
    # Every proxy scenario reports the proxy's CPU per request next to its numbers.
    assert re.search(r"^miss\s+32\s+\d+\s+[\d.]+\s+[\d.]+\s+\d+\s+\d+\s+\d+  201:", out, re.M)
    assert re.search(r"^proxy RSS after the run .*(PASS|MISS)$", out, re.M)
    # The natural-key routes: what an XML route costs next to a JSON route.
    assert re.search(r"^key routes miss c=32  json \d+ req/s .* xml/json \d+\.\d+x", out, re.M)
    assert re.search(r"^key \+ fingerprint CPU per request .* json \d+ us, xml \d+ us$", out, re.M)
    assert "\nvalid:" in out
    # --quick never writes the report.
    assert "wrote " not in out
