"""`make loadtest-smoke` as CI runs it: Redis, backend, three replicas and a short locust run.

Locust's exit code carries the verdict: 0 only if no load-test order was charged more than
once (the ledger check in the locustfile) and every outcome was one its user class allows.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from harness import REPO_ROOT, redis_binaries_missing


@pytest.mark.replicas
@pytest.mark.timeout(150)
def test_loadtest_smoke_passes_with_no_double_charge() -> None:
    if redis_binaries_missing("redis-server"):
        pytest.fail("redis-server not on PATH (apt-get install redis-server)", pytrace=False)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("PROXY_HOSTS", None)
    proc = subprocess.run(
        # Exactly what `make loadtest-smoke` runs: 15 s of load plus start-up (~25 s); the
        # bound only covers a badly loaded machine.
        [sys.executable, str(REPO_ROOT / "loadtests" / "smoke.py")],
        cwd=REPO_ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=140,
    )
    output = proc.stdout
    assert proc.returncode == 0, output
    assert "none more than once" in output, output
    # Every story ran and ended the way the contract says.
    for user, kind, outcome in (
        ("UniquePayer", "pay", "201"),
        ("DoubleClicker", "click", "409"),
        ("Retrier", "first, gives up", "timeout"),
        ("Retrier", "retry after", "replay"),
        ("Tamperer", "changed amount", "422"),
        ("SoapPayer", "submit again", "replay"),
    ):
        assert any(
            line.split()[:1] == [user] and kind in line and f" {outcome} " in line
            for line in output.splitlines()
        ), (user, kind, outcome, output)
    assert "unexpected" not in output, output
