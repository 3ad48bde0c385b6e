"""Child processes on 127.0.0.1: free ports, start, wait until ready, stop by process group.

Every child runs in its own session (process group), so that stop, kill, pause and resume
reach everything it spawned; on Linux it also dies with its parent (PR_SET_PDEATHSIG), and
an ``atexit`` sweep SIGKILLs whatever is still registered, so nothing outlives the run.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import Self

import httpx

HOST = "127.0.0.1"
# The directory holding `proxy`, `sample_backend` and `devstack`: children import from it.
CODE_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_BUS_OFFSET = 10000
STOP_TIMEOUT = 10.0


class StackError(RuntimeError):
    """A process failed to start or become ready (the message carries its log)."""


# --------------------------------------------------------------------------- ports

_issued_ports: set[int] = set()
_ports_lock = threading.Lock()


def _port_is_free(port: int) -> bool:
    """Probe by binding, the only reliable way to know the kernel will let a child bind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _port_share() -> tuple[int, int]:
    """(this process's share, shares): under pytest-xdist each worker process takes only
    the ports of its own residue class, so two workers never hand out the same port."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if not worker.startswith("gw") or count <= 1:
        return 0, 1
    return int(worker[2:]) % count, count


def free_port() -> int:
    """A TCP port nobody listens on right now, never one handed out before in this process
    (nor, under pytest-xdist, by another worker).

    The kernel may offer a just-released port again; two of our children would then race
    for it, so every port handed out is remembered.
    """
    share, shares = _port_share()
    for _ in range(200):
        if shares == 1:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port = int(sock.getsockname()[1])
        else:
            # The kernel's own pick for bind() is always even: draw from this worker's
            # residue class instead, below the ephemeral range outbound sockets use, and probe.
            port = random.randrange(15000, 32000 - shares, shares) + share
            if not _port_is_free(port):
                continue
        with _ports_lock:
            if port not in _issued_ports:
                _issued_ports.add(port)
                return port
    raise StackError("could not find a free TCP port")


def free_port_pair() -> tuple[int, int]:
    """``(P, P + 10000)``, both free: a Redis Cluster node needs its bus port too."""
    for _ in range(500):
        port = free_port()
        bus = port + CLUSTER_BUS_OFFSET
        if bus > 65535:
            continue
        with _ports_lock:
            if bus in _issued_ports:
                continue
        if _port_is_free(bus):
            with _ports_lock:
                _issued_ports.add(bus)
            return port, bus
    raise StackError("could not find a free port pair (P, P+10000)")


# --------------------------------------------------------------------------- environment

_PR_SET_PDEATHSIG = 1


def die_with_parent(cpus: set[int] | None = None) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when its parent dies hard (kill -9),
    and to run it on `cpus` only when given.

    The death signal only from the main thread: it fires when the forking *thread* exits,
    which would kill servers started from short-lived worker threads.
    """
    prctl: Callable[..., int] | None = None
    main = threading.current_thread() is threading.main_thread()
    if sys.platform.startswith("linux") and main:
        with contextlib.suppress(OSError, AttributeError):
            prctl = ctypes.CDLL(None, use_errno=True).prctl
    if prctl is None and not cpus:
        return None

    def preexec() -> None:
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if cpus:
            os.sched_setaffinity(0, cpus)

    return preexec


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment, unbuffered, with 127.0.0.1 kept off any HTTP proxy and this code
    first on PYTHONPATH (children run the same `proxy` as their parent), plus `extra`."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    hosts = [h for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h]
    hosts += [h for h in (HOST, "localhost") if h not in hosts]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(hosts)
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(CODE_ROOT) + (os.pathsep + existing if existing else "")
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- waiting


def wait_for_port(
    host: str,
    port: int,
    timeout: float = 10.0,
    *,
    alive: ManagedProcess | None = None,
) -> None:
    """Block until ``host:port`` accepts TCP connections.

    With ``alive`` given, fail fast (with the process log) if that process exits,
    instead of waiting out the whole timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if alive is not None:
            alive.check_alive(f"waiting for {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(0.05)


def wait_for_http(
    url: str,
    timeout: float = 10.0,
    *,
    status: int | None = 200,
    alive: ManagedProcess | None = None,
) -> httpx.Response:
    """Block until GET ``url`` answers with ``status`` (any status if ``None``).

    ``trust_env=False`` so that a developer's HTTP(S)_PROXY never intercepts 127.0.0.1.
    """
    deadline = time.monotonic() + timeout
    last: str = "no attempt"
    with httpx.Client(timeout=1.0, trust_env=False, verify=False) as client:
        while True:
            if alive is not None:
                alive.check_alive(f"waiting for {url}")
            try:
                response = client.get(url)
                if status is None or response.status_code == status:
                    return response
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise TimeoutError(f"GET {url} not ready within {timeout}s (last: {last})")
            time.sleep(0.05)


# --------------------------------------------------------------------------- processes

_live: dict[int, ManagedProcess] = {}
_live_lock = threading.Lock()


def _kill_all_live() -> None:
    """atexit sweep: SIGKILL every process group still registered."""
    with _live_lock:
        procs = list(_live.values())
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.kill()


atexit.register(_kill_all_live)


def iter_live() -> Iterator[ManagedProcess]:
    """Processes still owned (debugging aid)."""
    with _live_lock:
        yield from list(_live.values())


class StartStop:
    """``with server:`` starts it (unless it already runs) and stops it on the way out."""

    @property
    def running(self) -> bool:
        raise NotImplementedError

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ManagedProcess(StartStop):
    """One child process in its own process group, logging to a file, cleaned up always.

    ``start()`` is ``launch()`` then ``wait_ready()``; a caller starting several children
    side by side launches them all, then waits for each (``ready()``).
    """

    name = "process"

    def __init__(self, workdir: Path, log_name: str, *, cpus: set[int] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / log_name
        self.cpus = cpus
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- subclass hooks
    def command(self) -> list[str]:
        """The argv to launch."""
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        """Environment for the child (``None`` inherits unchanged)."""
        return None

    def wait_ready(self) -> None:
        """Block until the child serves requests."""

    # -- lifecycle
    def launch(self) -> Self:
        """Start the child without waiting for it to be ready."""
        if self.running:
            raise StackError(f"{self.name} already running (pid {self.pid})")
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {' '.join(self.command())}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self.environment(),
                # A new session keeps a terminal's Ctrl-C away from the children too: the
                # parent stops them itself, in order, instead of racing them.
                start_new_session=True,
                preexec_fn=die_with_parent(self.cpus),
            )
        self._paused = False
        with _live_lock:
            _live[id(self)] = self
        return self

    def ready(self) -> Self:
        """Wait for a launched child to be ready; on failure kill it and raise with its log."""
        try:
            self.wait_ready()
        except BaseException as exc:
            self.kill()
            if isinstance(exc, StackError):
                raise
            raise StackError(
                f"{self.name} failed to become ready: {exc}\n{self.log_tail()}"
            ) from exc
        return self

    def start(self) -> Self:
        """Launch the child and wait for readiness."""
        return self.launch().ready()

    def restart(self) -> Self:
        """Stop (if running) and start again on the same port and dir (Redis reloads any AOF)."""
        if self.running:
            self.stop()
        return self.start()

    def revive(self) -> Self:
        """Resume if paused, start if stopped: a shared server outlives the tests that break it."""
        if self.paused:
            self.resume()
        if not self.running:
            self.start()
        return self

    @property
    def pid(self) -> int:
        """PID of the child (also its process-group id)."""
        if self._proc is None:
            raise StackError(f"{self.name} was never started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """True while the child has not exited."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def paused(self) -> bool:
        """True between pause() and resume()."""
        return self._paused and self.running

    def check_alive(self, doing: str) -> None:
        """Raise with the log if the child already exited (used while waiting)."""
        if self._proc is not None and self._proc.poll() is not None:
            raise StackError(
                f"{self.name} exited with code {self._proc.returncode} while {doing}\n"
                f"{self.log_tail()}"
            )

    def signal_group(self, sig: signal.Signals) -> None:
        """Send `sig` to the child's whole process group."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def terminate(self) -> None:
        """SIGTERM the group without waiting (stop() then waits), to stop many at once."""
        if self.running:
            self.signal_group(signal.SIGTERM)
            if self._paused:
                self.signal_group(signal.SIGCONT)

    def _reap(self) -> None:
        """Forget the child and SIGKILL any stragglers left in its group."""
        self.signal_group(signal.SIGKILL)
        self._paused = False
        with _live_lock:
            _live.pop(id(self), None)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the group and wait; SIGKILL if it does not exit in ``timeout`` seconds."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self._proc.wait(5)
        self._reap()
        return self._proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group: a crash, with no chance to clean up."""
        if self._proc is None:
            return None
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        self._reap()
        return self._proc.returncode

    def pause(self) -> None:
        """SIGSTOP the group: the process hangs with its sockets open (a GC pause/freeze)."""
        if not self.running:
            raise StackError(f"{self.name} is not running")
        self.signal_group(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT the group after pause()."""
        self.signal_group(signal.SIGCONT)
        self._paused = False

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit on its own and return its exit code."""
        if self._proc is None:
            raise StackError(f"{self.name} was never started")
        code = self._proc.wait(timeout)
        self._reap()
        return code

    def logs(self) -> str:
        """Everything the child wrote to stdout/stderr so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, limit: int = 8000) -> str:
        """The end of the log, headed by its path."""
        text = self.logs()
        if len(text) > limit:
            text = "...\n" + text[-limit:]
        return f"--- {self.log_path} ---\n{text}"


def stop_all(procs: Sequence[ManagedProcess], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every group at once, then wait for each (SIGKILL after `timeout`)."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.stop(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------- signals


def terminate_as_interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so every finally block runs.
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate_as_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
