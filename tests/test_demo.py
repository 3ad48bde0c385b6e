"""`idempotency-proxy demo` end to end, as a user runs it: a real subprocess.

What matters: the ledger shows double charges straight to the backend and none through
the replicas, the exit code says so, and nothing the demo started outlives it, also
when it is interrupted.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from harness import HOST, REPO_ROOT, redis_binaries_missing

DEMO_TIMEOUT = 90.0  # the demo takes ~10 s; the bound is for a badly loaded machine


def _demo_env(tmp_path: Path, path: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The demo's work dir lands here, so every child's command line names tmp_path:
    # that is how the test finds processes left behind.
    workroot = tmp_path / "tmp"
    workroot.mkdir(exist_ok=True)
    env["TMPDIR"] = str(workroot)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT)
    if path is not None:
        env["PATH"] = path
    return env


def _default_sigint() -> None:
    # A background pytest may ignore SIGINT, and children inherit that; the demo must see
    # Ctrl-C as a user's terminal delivers it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run_demo(tmp_path: Path, *args: str, path: str | None = None) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", *args],
        cwd=REPO_ROOT,
        env=_demo_env(tmp_path, path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=DEMO_TIMEOUT,
        preexec_fn=_default_sigint,
    )
    return proc.returncode, proc.stdout


def _table(output: str) -> dict[tuple[str, str], dict[str, str]]:
    """The summary table as {(story, mode): {column: value}}."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("story "))
    header = re.split(r"\s{2,}", lines[start].strip())
    rows: dict[tuple[str, str], dict[str, str]] = {}
    for line in lines[start + 2 :]:
        if not line.strip():
            break
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(header), line
        row = dict(zip(header, cells, strict=True))
        rows[(row["story"], row["mode"])] = row
    return rows


def _ports(output: str) -> list[int]:
    ports = [int(p) for p in re.findall(rf"{re.escape(HOST)}:(\d+)", output)]
    assert ports, output
    return ports


def _leftovers(marker: Path) -> list[str]:
    """Processes whose command line names `marker` (the demo's work dir lives in it)."""
    found = []
    needle = str(marker).encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline:
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry.name}: {command}")
    return found


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def _assert_nothing_left(tmp_path: Path, ports: list[int]) -> None:
    # The demo waits for its children before exiting, so this should hold at once; the
    # short poll only absorbs the kernel's bookkeeping on a loaded machine.
    deadline = time.monotonic() + 5.0
    while True:
        left = _leftovers(tmp_path)
        busy = [port for port in ports if _listening(port)]
        if not left and not busy:
            break
        if time.monotonic() > deadline:
            pytest.fail(f"left behind: processes {left}, listening ports {busy}")
        time.sleep(0.1)
    assert list((tmp_path / "tmp").iterdir()) == [], "the demo's work dir was not removed"


def _assert_stories(output: str, orders: int) -> None:
    table = _table(output)
    stories = ("double click", "timeout+retry", "slow+reset", "legacy SOAP", "burst")
    assert {story for story, _ in table} == set(stories), output
    for story in stories:
        direct, proxied = table[(story, "direct")], table[(story, "proxied")]
        expected_orders = orders if story == "burst" else 1
        assert int(direct["orders"]) == int(proxied["orders"]) == expected_orders
        # Straight to the backend every request is a charge, so duplicates charge twice.
        assert int(direct["backend charges"]) == int(direct["requests"]), (story, output)
        assert int(direct["charged twice"]) >= 1, (story, output)
        # Through the replicas: every order charged exactly once, whatever was resent.
        assert int(proxied["backend charges"]) == expected_orders, (story, output)
        assert int(proxied["charged twice"]) == 0, (story, output)
        assert int(proxied["other"]) == 0, (story, output)
        # In the retry stories the one execution's caller timed out or saw no answer.
        if story not in ("timeout+retry", "slow+reset"):
            # Every request but one per order was answered without reaching the backend.
            duplicates = sum(int(proxied[c]) for c in ("replays", "409s", "422s"))
            assert duplicates == int(proxied["requests"]) - expected_orders, (story, output)
        # Observe mode: charged exactly as straight to the backend, and every duplicate
        # counted as one enforcement would have answered without charging.
        observed = table[(story, "observe")]
        for column in ("orders", "requests", "backend charges", "charged twice"):
            assert observed[column] == direct[column], (story, column, output)
        assert observed["other"] == "0" and observed["replays"] == "0", (story, output)
        assert int(observed["would prevent"]) == int(observed["requests"]) - expected_orders
        assert direct["would prevent"] == proxied["would prevent"] == "-", output
    # The tampered copies of the burst were refused, never charged.
    assert int(table[("burst", "proxied")]["422s"]) >= 1, output
    # The retry story: the impatient caller's retries got a 409, then the replay.
    retry = table[("timeout+retry", "proxied")]
    assert int(retry["409s"]) >= 1 and int(retry["replays"]) == 1, output
    # The SOAP client's second submit, re-serialised by its library, was the replay.
    assert int(table[("legacy SOAP", "proxied")]["replays"]) == 1, output
    # Slow, then reset: straight to the backend the retry charged again; through the
    # proxies, outcome-unknown until the status check found the charge, then its replay.
    reset = table[("slow+reset", "proxied")]
    assert int(reset["unknown"]) >= 1 and int(reset["replays"]) == 1, output
    assert int(table[("slow+reset", "direct")]["backend charges"]) == 2, output
    assert "none through the proxies" in output, output


@pytest.mark.replicas
def test_demo_with_redis_and_five_replica_processes(tmp_path: Path) -> None:
    if redis_binaries_missing("redis-server"):
        pytest.fail("redis-server not on PATH (apt-get install redis-server)", pytrace=False)
    code, output = _run_demo(tmp_path, "--orders", "30")
    assert code == 0, output
    started = next(line for line in output.splitlines() if line.startswith("started:"))
    assert "redis redis://" in started, output
    replicas, observers = started.split("replicas ")[1].split("| observing ")
    assert started.count("replicas ") == 1 and len(_ports(replicas)) == 5
    assert len(_ports(observers)) == 2
    _assert_stories(output, 30)
    _assert_nothing_left(tmp_path, _ports(started))


def test_demo_memory_flag_runs_replicas_in_process(tmp_path: Path) -> None:
    code, output = _run_demo(tmp_path, "--orders", "30", "--memory")
    assert code == 0, output
    lines = output.splitlines()
    assert lines[0].startswith("--memory:") and "apt-get install redis-server" in lines[0]
    assert not any(line.startswith("started: redis") for line in lines), output
    _assert_stories(output, 30)
    _assert_nothing_left(tmp_path, _ports(output))


@pytest.mark.parametrize("error_format", ["stripe", "gocardless"])
def test_demo_reads_the_proxys_answers_in_a_preset_format(
    tmp_path: Path, error_format: str
) -> None:
    # In progress is 409 in both, a reused key is 400 (Stripe) or 409 (GoCardless): the
    # demo's client tells them apart by the error body, not by the status.
    code, output = _run_demo(tmp_path, "--orders", "30", "--memory", "--error-format", error_format)
    assert code == 0, output
    _assert_stories(output, 30)
    _assert_nothing_left(tmp_path, _ports(output))


def test_demo_without_redis_server_says_so_once_and_falls_back(tmp_path: Path) -> None:
    # A PATH with no redis-server; the demo's children are started with sys.executable.
    empty = tmp_path / "bin"
    empty.mkdir()
    code, output = _run_demo(tmp_path, "--orders", "10", path=str(empty))
    assert code == 0, output
    notes = [line for line in output.splitlines() if "redis-server" in line]
    assert len(notes) == 1, output
    assert (
        notes[0].startswith("redis-server not found") and "apt-get install redis-server" in notes[0]
    )
    _assert_stories(output, 10)
    _assert_nothing_left(tmp_path, _ports(output))


@pytest.mark.replicas
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_demo_interrupted_stops_everything_it_started(tmp_path: Path, sig: signal.Signals) -> None:
    if redis_binaries_missing("redis-server"):
        pytest.fail("redis-server not on PATH (apt-get install redis-server)", pytrace=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "demo", "--orders", "30"],
        cwd=REPO_ROOT,
        env=_demo_env(tmp_path),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=_default_sigint,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + DEMO_TIMEOUT
        # Interrupt in the middle of the slow story: a backend request is still sleeping
        # and the replicas have a forward in flight.
        while not any(line.startswith("timeout+retry") for line in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "".join(seen)
            seen.append(line)
        proc.send_signal(sig)
        code = proc.wait(DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    output = "".join(seen)
    assert code == 130, output
    assert "interrupted" in output and "story " not in output, output
    started = next(line for line in seen if line.startswith("started:"))
    _assert_nothing_left(tmp_path, _ports(started))


def test_demo_without_the_development_stack_says_so_in_one_line(tmp_path: Path) -> None:
    # An installation without devstack/ (e.g. the production image): one line, exit 2.
    script = (
        "import sys; sys.modules['devstack'] = None; "
        "from proxy.cli import main; main(['demo', '--orders', '1'])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=_demo_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "devstack" in lines[0] and "make demo" in lines[0], proc.stderr
