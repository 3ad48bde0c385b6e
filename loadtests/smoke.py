"""`make loadtest-smoke`: a short headless locust run against three local proxy replicas.

Starts a private Redis, the sample backend and three replicas (`devstack.stack.Stack`, as
the demo does), runs loadtests/locustfile.py headless for a bounded time with every user
class, prints locust's summary and the ledger check, stops everything, and exits with
locust's exit code.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from devstack.processes import sigterm_as_interrupt  # noqa: E402
from devstack.servers import REDIS_HINT, redis_binaries_missing  # noqa: E402
from devstack.stack import Stack  # noqa: E402

REPLICAS = 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", default="15s", help="locust run time (default: 15s)")
    parser.add_argument("--users", type=int, default=12, help="locust users (default: 12)")
    parser.add_argument("--replicas", type=int, default=REPLICAS, help="(default: 3)")
    args = parser.parse_args(argv)
    if redis_binaries_missing("redis-server"):
        print(f"loadtest-smoke: redis-server not found on PATH ({REDIS_HINT})", file=sys.stderr)
        return 2
    with sigterm_as_interrupt(), Stack() as stack:
        try:
            stack.start_replicated(args.replicas)
            print(f"started: {stack.describe()}", flush=True)
            env = dict(os.environ, BACKEND_URL=stack.backend_url, PYTHONUNBUFFERED="1")
            env.pop("PROXY_HOSTS", None)  # the replicas just started, not a leftover setting
            command = [
                sys.executable,
                "-m",
                "locust",
                "-f",
                str(HERE / "locustfile.py"),
                "--headless",
                "--users",
                str(args.users),
                "--spawn-rate",
                str(args.users),
                "--run-time",
                args.time,
                # Let users finish their current story (a retry takes ~2 s) before the end.
                "--stop-timeout",
                "4",
                "--host",
                ",".join(stack.proxy_urls),
                "--only-summary",
                "--exit-code-on-error",
                "1",
                "--loglevel",
                "WARNING",
            ]
            # Bounded: the run time plus start-up and the stop timeout, with room to spare.
            return subprocess.run(command, env=env, cwd=ROOT, timeout=120).returncode
        except KeyboardInterrupt:
            print("\ninterrupted: stopping everything", file=sys.stderr)
            return 130
        except subprocess.TimeoutExpired:
            print("loadtest-smoke: locust did not finish in time", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
