"""Real-process test harness: Redis, Redis Cluster, the sample backend and the proxy.

Every test suite drives real processes on 127.0.0.1 so that crashes, pauses and restarts
behave as in production. Each child runs in its own session (process group) so that
stop/kill/pause reach everything it spawned, and every child is registered for an
``atexit`` sweep so nothing outlives the test run, even when a test fails mid-way.

The last section holds what several suites send and read back: the `pay` route, its
bodies, record keys and fingerprints, and what a client saw for each payment.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx
import orjson
import redis
import redis.cluster
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from proxy import keys
from proxy.demo import child_env, die_with_parent
from proxy.fingerprint import fingerprint
from proxy.request import ProxyRequest

HOST = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_BUS_OFFSET = 10000

__all__ = [
    "HOST",
    "JSON_HEADERS",
    "PAY_PATH",
    "REPO_ROOT",
    "BackendFactory",
    "BackendServer",
    "HarnessError",
    "ManagedProcess",
    "Outcome",
    "ProxyFactory",
    "ProxyServer",
    "RedisCluster",
    "RedisFactory",
    "RedisServer",
    "ServerFactory",
    "body_of",
    "charges_route",
    "eventually",
    "fingerprint_of",
    "free_port",
    "free_port_pair",
    "pay",
    "pay_config",
    "pay_route",
    "pay_until",
    "print_logs",
    "problem_name",
    "proxy_request",
    "records_cli",
    "redis_binaries_missing",
    "storage_key",
    "tally",
    "wait_for_http",
    "wait_for_port",
]

T = TypeVar("T")


class HarnessError(RuntimeError):
    """A managed process failed to start or become ready (message carries its log)."""


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


def free_port() -> int:
    """Return a currently free TCP port, never one already handed out in this run.

    The kernel may recycle a just-released ephemeral port, so remembering issued
    ports avoids two servers of one session racing for the same number.
    """
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        with _ports_lock:
            if port not in _issued_ports:
                _issued_ports.add(port)
                return port
    raise HarnessError("could not find a free TCP port")


def free_port_pair() -> tuple[int, int]:
    """Return ``(P, P + 10000)``, both free: a Redis Cluster node needs its bus port too."""
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
    raise HarnessError("could not find a free port pair (P, P+10000)")


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


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The demo's child environment (unbuffered, 127.0.0.1 off any proxy), with this
    checkout first on PYTHONPATH and the caller's extra variables."""
    env = child_env()
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + existing if existing else "")
    if extra:
        env.update(extra)
    return env


class _StartStop:
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


class ManagedProcess(_StartStop):
    """One child process in its own process group, logging to a file, cleaned up always."""

    name = "process"

    def __init__(self, workdir: Path, log_name: str) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / log_name
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
    def start(self) -> Self:
        """Launch the child and wait for readiness; on failure kill it and raise with its log."""
        if self.running:
            raise HarnessError(f"{self.name} already running (pid {self.pid})")
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
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._paused = False
        with _live_lock:
            _live[id(self)] = self
        try:
            self.wait_ready()
        except BaseException as exc:
            self.kill()
            if isinstance(exc, HarnessError):
                raise
            raise HarnessError(
                f"{self.name} failed to become ready: {exc}\n{self._log_tail()}"
            ) from exc
        return self

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
            raise HarnessError(f"{self.name} was never started")
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
            raise HarnessError(
                f"{self.name} exited with code {self._proc.returncode} while {doing}\n"
                f"{self._log_tail()}"
            )

    def _signal_group(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _reap(self) -> None:
        """Forget the child and SIGKILL any stragglers left in its group."""
        self._signal_group(signal.SIGKILL)
        self._paused = False
        with _live_lock:
            _live.pop(id(self), None)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the group and wait; SIGKILL if it does not exit in ``timeout`` seconds."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            if self._paused:
                self._signal_group(signal.SIGCONT)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self._proc.wait(5)
        self._reap()
        return self._proc.returncode

    def kill(self) -> int | None:
        """SIGKILL the whole group: a crash, with no chance to clean up."""
        if self._proc is None:
            return None
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5)
        self._reap()
        return self._proc.returncode

    def pause(self) -> None:
        """SIGSTOP the group: the process hangs with its sockets open (a GC pause/freeze)."""
        if not self.running:
            raise HarnessError(f"{self.name} is not running")
        self._signal_group(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT the group after pause()."""
        self._signal_group(signal.SIGCONT)
        self._paused = False

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the child to exit on its own and return its exit code."""
        if self._proc is None:
            raise HarnessError(f"{self.name} was never started")
        code = self._proc.wait(timeout)
        self._reap()
        return code

    def logs(self) -> str:
        """Everything the child wrote to stdout/stderr so far (all starts)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, limit: int = 8000) -> str:
        text = self.logs()
        if len(text) > limit:
            text = "...\n" + text[-limit:]
        return f"--- {self.log_path} ---\n{text}"


class _PortServer(ManagedProcess):
    """A child serving on one 127.0.0.1 port, the same across restart()."""

    def __init__(
        self,
        workdir: Path,
        log_name: str,
        *,
        port: int | None,
        args: Sequence[str],
        ready_timeout: float,
    ) -> None:
        super().__init__(workdir, log_name)
        self._port = port if port is not None else free_port()
        self.args = list(args)
        self.ready_timeout = ready_timeout

    @property
    def port(self) -> int:
        """TCP port; stays the same across restart()."""
        return self._port


def print_logs(procs: Iterable[ManagedProcess], limit: int = 20000) -> None:
    """Print the end of each process's log: pytest shows what a failed test printed."""
    for proc in procs:
        print(f"\n===== {proc.name} log =====\n{proc._log_tail(limit)}")


# --------------------------------------------------------------------------- redis


def redis_binaries_missing(*names: str) -> list[str]:
    """Names among ``redis-server``/``redis-cli`` (or ``names``) not found on PATH."""
    wanted = names or ("redis-server", "redis-cli")
    return [n for n in wanted if shutil.which(n) is None]


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate,
    all signed by the CA (PEM files made with the openssl command)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def create(
        cls, directory: Path, server_names: Sequence[str] = ("IP:127.0.0.1", "DNS:localhost")
    ) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)

        def openssl(*args: str) -> None:
            result = subprocess.run(
                ["openssl", *args], capture_output=True, text=True, timeout=30, check=False
            )
            if result.returncode != 0:
                raise HarnessError(f"openssl {args[0]} failed: {result.stderr}")

        ca_key, ca = directory / "ca.key", directory / "ca.crt"
        openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            str(ca_key),
            "-out",
            str(ca),
        )
        files = {}
        for name, extension in (
            ("server", f"subjectAltName={','.join(server_names)}"),
            ("client", "extendedKeyUsage=clientAuth"),
        ):
            key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
            ext_file = directory / f"{name}.ext"
            ext_file.write_text(extension + "\n")
            openssl(
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                f"/CN=test-{name}",
                "-keyout",
                str(key),
                "-out",
                str(csr),
            )
            openssl(
                "x509",
                "-req",
                "-in",
                str(csr),
                "-CA",
                str(ca),
                "-CAkey",
                str(ca_key),
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                str(ext_file),
                "-out",
                str(cert),
            )
            files[name] = (cert, key)
        return cls(ca, *files["server"], *files["client"])

    def server_args(self) -> list[str]:
        """redis-server options: TLS only, client certificates optional (as most managed
        Redis services: the password or ACL user authenticates)."""
        return [
            "--tls-cert-file",
            str(self.server_cert),
            "--tls-key-file",
            str(self.server_key),
            "--tls-ca-cert-file",
            str(self.ca),
            "--tls-auth-clients",
            "optional",
        ]

    def cli_args(self) -> list[str]:
        return [
            "--tls",
            "--cacert",
            str(self.ca),
            "--cert",
            str(self.client_cert),
            "--key",
            str(self.client_key),
        ]

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "ssl": True,
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
        }

    def store_settings(self, *, client_cert: bool = True) -> dict[str, Any]:
        """The proxy's `store.tls` section for these files."""
        section: dict[str, Any] = {"ca_file": str(self.ca)}
        if client_cert:
            section.update(cert_file=str(self.client_cert), key_file=str(self.client_key))
        return section


# The commands the proxy runs, and the ACL that allows exactly them (docs/operations.md).
PROXY_ACL_RULES = (
    "~idem:* resetchannels &idem:settled -@all "
    "+ping +hello +auth +select +readonly "
    "+evalsha +script|load "
    "+hgetall +pttl +time +get +set +wait "
    "+hget +hmget +hset +hdel +hincrby +del +exists +type +pexpire "
    "+cluster|slots +cluster|shards +command +info +publish +subscribe"
)


def acl_user_args(user: str, password: str, rules: str = PROXY_ACL_RULES) -> list[str]:
    """redis-server options that add an ACL user (the default user stays for the tests)."""
    # One argv word per ACL rule: redis-server joins the words after --user into one line.
    return ["--user", user, "on", f">{password}", *rules.split()]


class SentinelServer(ManagedProcess):
    """`redis-server sentinel.conf --sentinel` watching one master, optionally over TLS and
    with its own password (`requirepass` on the sentinel)."""

    name = "redis-sentinel"

    def __init__(
        self,
        workdir: Path,
        master_port: int,
        *,
        master_name: str = "mymaster",
        quorum: int = 1,
        tls: TlsFiles | None = None,
        password: str | None = None,
    ) -> None:
        super().__init__(workdir, "sentinel.log")
        self.port = free_port()
        self.tls = tls
        self.password = password
        self.master_name = master_name
        conf = [
            f"port {0 if tls else self.port}",
            f"bind {HOST}",
            "daemonize no",
            f'dir "{self.workdir}"',
            'logfile ""',
            "sentinel resolve-hostnames no",
            f"sentinel monitor {master_name} {HOST} {master_port} {quorum}",
            f"sentinel down-after-milliseconds {master_name} 1000",
            f"sentinel failover-timeout {master_name} 3000",
        ]
        if tls is not None:
            args = tls.server_args()
            conf += [f"tls-port {self.port}", "tls-replication yes"]
            conf += [f"{args[i][2:]} {args[i + 1]}" for i in range(0, len(args), 2)]
        if password is not None:
            conf.append(f"requirepass {password}")
        self.conf = self.workdir / "sentinel.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def command(self) -> list[str]:
        return ["redis-server", str(self.conf), "--sentinel"]

    def wait_ready(self) -> None:
        wait_for_port(HOST, self.port, 10.0, alive=self)

    def url_part(self) -> str:
        return f"{HOST}:{self.port}"


class RedisServer(_PortServer):
    """A throwaway ``redis-server`` with no RDB snapshots and optional AOF."""

    name = "redis-server"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        appendonly: bool = False,
        args: Sequence[str] = (),
        ready_timeout: float = 10.0,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(workdir, "redis.log", port=port, args=args, ready_timeout=ready_timeout)
        self.appendonly = appendonly
        # With TLS the port speaks only TLS (`--port 0 --tls-port P`), as a managed Redis does.
        self.tls = tls

    @property
    def host(self) -> str:
        """Always 127.0.0.1."""
        return HOST

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:P/0`` (``rediss://`` with TLS)."""
        return f"{'rediss' if self.tls else 'redis'}://{HOST}:{self._port}/0"

    def command(self) -> list[str]:
        """redis-server argv; ``--logfile ""`` sends logs to stdout, i.e. our log file."""
        ports = ["--port", str(self._port)]
        if self.tls is not None:
            ports = ["--port", "0", "--tls-port", str(self._port), *self.tls.server_args()]
        return [
            "redis-server",
            *ports,
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--dir",
            str(self.workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            "",
            *self.args,
        ]

    def client(self, **kwargs: Any) -> redis.Redis:
        """A sync client that fails fast on a paused/killed server.

        redis-py 8 retries 10 times with backoff by default, which would hide (and slow
        down) exactly the failures chaos tests provoke; pass ``retry=`` to opt back in.
        """
        kwargs.setdefault("retry", Retry(NoBackoff(), 0))
        kwargs.setdefault("socket_timeout", 5.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        if self.tls is not None:
            kwargs = {**self.tls.client_kwargs(), **kwargs}
        return redis.Redis(host=HOST, port=self._port, **kwargs)

    def wait_ready(self) -> None:
        """PING succeeds and any AOF has finished loading."""
        deadline = time.monotonic() + self.ready_timeout
        last = "no attempt"
        while True:
            self.check_alive("waiting for PING")
            try:
                with self.client(socket_timeout=1.0, socket_connect_timeout=0.5) as c:
                    if c.ping() and int(c.info("persistence").get("loading", 0)) == 0:
                        return
                    last = "still loading"
            except redis.RedisError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                raise HarnessError(
                    f"redis-server on port {self._port} not ready within "
                    f"{self.ready_timeout}s (last: {last})\n{self._log_tail()}"
                )
            time.sleep(0.05)

    def flushall(self) -> None:
        """Delete every key: a clean store for the next test."""
        with self.client() as client:
            client.flushall()


class RedisCluster(_StartStop):
    """Three Redis Cluster masters (no replicas) on 127.0.0.1, all 16384 slots assigned."""

    def __init__(
        self,
        workdir: Path,
        *,
        masters: int = 3,
        args: Sequence[str] = (),
        ready_timeout: float = 30.0,
        tls: TlsFiles | None = None,
    ) -> None:
        self.tls = tls
        if tls is not None:
            args = ["--tls-cluster", "yes", "--tls-replication", "yes", *args]
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ready_timeout = ready_timeout
        self.nodes: list[RedisServer] = []
        for _ in range(masters):
            port, _bus = free_port_pair()
            self.nodes.append(
                RedisServer(
                    self.workdir / f"node-{port}",
                    port=port,
                    args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"nodes-{port}.conf",
                        "--cluster-node-timeout",
                        "5000",
                        *args,
                    ],
                    tls=tls,
                )
            )

    @property
    def ports(self) -> list[int]:
        """Client ports of the masters."""
        return [n.port for n in self.nodes]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every master, for cluster clients' startup_nodes."""
        return [(HOST, n.port) for n in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:P1`` (the proxy discovers the rest); ``rediss+`` with TLS."""
        scheme = "rediss+cluster" if self.tls else "redis+cluster"
        return f"{scheme}://{HOST}:{self.nodes[0].port}"

    @property
    def running(self) -> bool:
        """True while every node runs."""
        return all(n.running for n in self.nodes)

    def start(self) -> Self:
        """Start nodes, join them with ``redis-cli --cluster create`` and wait for state ok."""
        try:
            for node in self.nodes:
                node.start()
            self._create()
            self._wait_ok()
        except BaseException:
            self.stop()
            raise
        return self

    def _create(self) -> None:
        cmd = [
            "redis-cli",
            "--cluster",
            "create",
            *(f"{HOST}:{p}" for p in self.ports),
            "--cluster-replicas",
            "0",
            "--cluster-yes",
            *(self.tls.cli_args() if self.tls else []),
        ]
        try:
            result = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.ready_timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HarnessError(f"{' '.join(cmd)} timed out") from exc
        if result.returncode != 0:
            raise HarnessError(
                f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
            )

    def _wait_ok(self) -> None:
        """Every node reports ``cluster_state:ok`` and knows all the others."""
        deadline = time.monotonic() + self.ready_timeout
        last: dict[str, Any] = {}
        while True:
            ok = True
            for node in self.nodes:
                try:
                    with node.client(socket_timeout=1.0) as c:
                        last = c.cluster("INFO")
                except redis.RedisError as exc:
                    last = {"error": str(exc)}
                    ok = False
                    break
                if (
                    str(last.get("cluster_state")) != "ok"
                    or int(last.get("cluster_known_nodes", 0)) != len(self.nodes)
                    or int(last.get("cluster_slots_ok", 0)) != 16384
                ):
                    ok = False
                    break
            if ok:
                return
            if time.monotonic() >= deadline:
                raise HarnessError(f"cluster not ok within {self.ready_timeout}s: {last}")
            time.sleep(0.1)

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A sync cluster client bootstrapped from every master."""
        kwargs.setdefault("socket_timeout", 5.0)
        if self.tls is not None:
            kwargs = {**self.tls.client_kwargs(), **kwargs}
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in self.startup_nodes]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()


# --------------------------------------------------------------------------- http servers


class _HttpServer(_PortServer):
    """Shared bits of the Python HTTP servers we launch."""

    def __init__(
        self,
        workdir: Path,
        log_name: str,
        *,
        port: int | None,
        args: Sequence[str],
        env: Mapping[str, str] | None,
        ready_timeout: float,
    ) -> None:
        super().__init__(workdir, log_name, port=port, args=args, ready_timeout=ready_timeout)
        self.env = dict(env or {})

    @property
    def url(self) -> str:
        """``http://127.0.0.1:P``."""
        return f"http://{HOST}:{self._port}"

    def environment(self) -> dict[str, str]:
        """Inherited env plus the extra vars given at construction."""
        return _child_env(self.env)

    def http(self, timeout: float = 10.0) -> httpx.Client:
        """A sync client bound to this server (ignores proxy env vars)."""
        return httpx.Client(verify=False, base_url=self.url, timeout=timeout, trust_env=False)


class BackendServer(_HttpServer):
    """The sample payment backend, counting every charge in a SQLite ledger."""

    name = "sample_backend"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        db: Path | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            workdir, "backend.log", port=port, args=args, env=env, ready_timeout=ready_timeout
        )
        self.db = Path(db) if db is not None else self.workdir / "ledger.db"

    def command(self) -> list[str]:
        """``python -m sample_backend --host --port --db`` plus extra args."""
        return [
            sys.executable,
            "-m",
            "sample_backend",
            "--host",
            HOST,
            "--port",
            str(self._port),
            "--db",
            str(self.db),
            *self.args,
        ]

    def wait_ready(self) -> None:
        """``GET /healthz`` answers 200 (start() adds the log to any failure)."""
        wait_for_http(f"{self.url}/healthz", self.ready_timeout, alive=self)

    def ledger(self) -> dict[str, Any]:
        """``GET /v1/ledger``: the ground truth on how many times each order was charged."""
        with self.http() as client:
            response = client.get("/v1/ledger")
            response.raise_for_status()
            data: dict[str, Any] = response.json()
            return data

    def reset(self) -> None:
        """``POST /v1/ledger/reset``: start a test from an empty ledger."""
        with self.http() as client:
            client.post("/v1/ledger/reset").raise_for_status()


class ProxyServer(_HttpServer):
    """The idempotency proxy CLI (``python -m proxy run``) as a real process."""

    name = "proxy"

    def __init__(
        self,
        workdir: Path,
        *,
        upstream: str,
        redis_url: str | None = None,
        config: Mapping[str, Any] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        admin_port: int | None = None,
        log_level: str = "info",
        ready_timeout: float = 15.0,
    ) -> None:
        super().__init__(
            workdir, "proxy.log", port=port, args=args, env=env, ready_timeout=ready_timeout
        )
        self.upstream = upstream
        self.redis_url = redis_url
        self.admin_port = admin_port if admin_port is not None else free_port()
        self.log_level = log_level
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.workdir / "proxy-config.yaml"
            self.config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))

    @property
    def admin_url(self) -> str:
        """``http://127.0.0.1:ADMIN`` (health, metrics)."""
        return f"http://{HOST}:{self.admin_port}"

    def command(self) -> list[str]:
        """``python -m proxy run ...`` following the CLI contract."""
        cmd = [
            sys.executable,
            "-m",
            "proxy",
            "run",
            "--upstream",
            self.upstream,
            "--host",
            HOST,
            "--port",
            str(self._port),
            "--admin-port",
            str(self.admin_port),
            "--log-level",
            self.log_level,
        ]
        if self.redis_url is not None:
            cmd += ["--redis-url", self.redis_url]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd + self.args

    def wait_ready(self) -> None:
        """The traffic port accepts TCP connections (fails early if the proxy exits)."""
        wait_for_port(HOST, self._port, self.ready_timeout, alive=self)


# --------------------------------------------------------------------------- factories

S = TypeVar("S", bound=ManagedProcess)


class ServerFactory(Generic[S]):
    """Makes servers of one kind, each in a fresh temporary dir, and remembers them so the
    fixture can stop them (and show their logs) at teardown."""

    def __init__(self, mktemp: Callable[[str], Path]) -> None:
        self._mktemp = mktemp
        self.created: list[S] = []

    def _add(self, server: S, start: bool) -> S:
        self.created.append(server)
        if start:
            server.start()
        return server


class RedisFactory(ServerFactory[RedisServer]):
    """The ``redis_factory`` fixture: extra Redis servers with their own options."""

    def __call__(
        self,
        *,
        appendonly: bool = False,
        args: Sequence[str] = (),
        port: int | None = None,
        start: bool = True,
        tls: TlsFiles | None = None,
    ) -> RedisServer:
        server = RedisServer(
            self._mktemp("redis-extra"), port=port, appendonly=appendonly, args=args, tls=tls
        )
        return self._add(server, start)


class BackendFactory(ServerFactory[BackendServer]):
    """The ``backend_factory`` fixture: private backends with options."""

    def __call__(
        self,
        *,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        db: Path | None = None,
        start: bool = True,
    ) -> BackendServer:
        server = BackendServer(self._mktemp("backend-extra"), port=port, db=db, args=args, env=env)
        return self._add(server, start)


class ProxyFactory(ServerFactory[ProxyServer]):
    """The ``proxy_factory`` fixture: proxy processes (replicas share a redis_url)."""

    def __call__(
        self,
        upstream: str,
        redis_url: str | None = None,
        config: Mapping[str, Any] | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        admin_port: int | None = None,
        log_level: str = "info",
        start: bool = True,
    ) -> ProxyServer:
        proxy = ProxyServer(
            self._mktemp("proxy"),
            upstream=upstream,
            redis_url=redis_url,
            config=config,
            args=args,
            env=env,
            port=port,
            admin_port=admin_port,
            log_level=log_level,
        )
        return self._add(proxy, start)


def iter_live() -> Iterator[ManagedProcess]:
    """Processes this harness still owns (debugging aid)."""
    with _live_lock:
        yield from list(_live.values())


# --------------------------------------------------------------------------- payments
# The `pay` route and its traffic, as several suites send it.

PAY_PATH = "/v1/orders/pay"
JSON_HEADERS = {"content-type": "application/json"}


def pay_route(**overrides: Any) -> dict[str, Any]:
    """`POST /v1/orders/pay` keyed by the order id, so that a double click is one payment."""
    return {
        "name": "pay",
        "methods": ["POST"],
        "path": PAY_PATH,
        "key": {"from": "json", "field": "order_id"},
        **overrides,
    }


def charges_route(**overrides: Any) -> dict[str, Any]:
    """`POST /v1/charges` keyed by the Idempotency-Key header."""
    return {
        "name": "charges",
        "methods": ["POST"],
        "path": "/v1/charges",
        "key": {"from": "header", "name": "Idempotency-Key"},
        **overrides,
    }


def pay_config(**sections: Any) -> dict[str, Any]:
    """A proxy config with the `pay` route alone (key required) and admin on 127.0.0.1."""
    return {"admin": {"host": HOST}, **sections, "routes": [pay_route(required=True)]}


def body_of(order: str, amount: int = 1250) -> bytes:
    return orjson.dumps({"order_id": order, "amount": amount, "currency": "EUR"})


def storage_key(order: str) -> str:
    """The Redis key of `order`'s record on the `pay` route (default tenant)."""
    return keys.scope(keys.DEFAULT_TENANT, "pay", order).storage_key


def proxy_request(
    *,
    body: bytes = b"",
    content_type: str | None = None,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    method: str = "POST",
    path: str = PAY_PATH,
) -> ProxyRequest:
    """A request as the proxy parsed it (the content type goes after ``headers``)."""
    raw_headers = list(headers or [])
    if content_type is not None:
        raw_headers.append((b"content-type", content_type.encode("latin-1")))
    return ProxyRequest(
        method=method,
        path=path,
        raw_path=path.encode(),
        query_string=query,
        headers=raw_headers,
        body=body,
    )


def fingerprint_of(body: bytes) -> str:
    """The fingerprint the proxy computes for a JSON `body` paid on the `pay` route, to
    plant or forge a record as another owner would have written it."""
    return fingerprint(proxy_request(body=body, content_type="application/json"))


def problem_name(response: httpx.Response) -> str | None:
    """`store-unavailable`, `key-reused`...: the proxy's problem type, or None if not one."""
    if not response.headers.get("content-type", "").startswith("application/problem+json"):
        return None
    return str(response.json()["type"]).rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one client saw."""

    order: str
    status: int | None  # None: the connection broke without a response
    problem: str | None
    replayed: bool
    body: bytes = b""

    @property
    def label(self) -> str:
        if self.status is None:
            return "connection-error"
        label = str(self.status)
        if self.problem:
            label += f" {self.problem}"
        if self.replayed:
            label += " (replayed)"
        return label

    @property
    def executed_here(self) -> bool:
        """A fresh backend answer (not a replay, not a proxy problem)."""
        return self.status is not None and self.problem is None and not self.replayed


async def pay(
    http: httpx.AsyncClient,
    proxy: ProxyServer,
    order: str,
    faults: dict[str, str] | None = None,
) -> Outcome:
    """Pay `order` through `proxy` (`faults`: the backend's X-Sample-* headers)."""
    try:
        response = await http.post(
            proxy.url + PAY_PATH, content=body_of(order), headers={**JSON_HEADERS, **(faults or {})}
        )
    except httpx.TransportError:
        return Outcome(order, None, None, False)
    replayed = response.headers.get("idempotent-replayed") == "true"
    return Outcome(order, response.status_code, problem_name(response), replayed, response.content)


async def pay_until(
    http: httpx.AsyncClient,
    proxy: ProxyServer,
    order: str,
    *,
    retry_on: Sequence[str] = ("request-in-progress",),
    timeout: float = 20.0,
    interval: float = 0.2,
) -> list[Outcome]:
    """Send, and send again while the answer is one of `retry_on` (bounded): every try."""
    seen: list[Outcome] = []
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        outcome = await pay(http, proxy, order)
        seen.append(outcome)
        if outcome.problem not in retry_on or time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    return seen


def tally(title: str, outcomes: Iterable[Outcome]) -> Counter[str]:
    """Print how many clients saw each answer (run with ``-s``) and return the counts."""
    counts = Counter(outcome.label for outcome in outcomes)
    print(f"\n[{title}] " + ", ".join(f"{label}: {n}" for label, n in sorted(counts.items())))
    return counts


async def eventually(
    probe: Callable[[], Awaitable[T | None]],
    what: str,
    timeout: float = 20.0,
    interval: float = 0.1,
) -> T:
    """Poll until `probe` returns something other than None (bounded in tries and time)."""
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / interval) + 1):
        result = await probe()
        if result is not None:
            return result
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def records_cli(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """`idempotency-proxy records ...`, as an operator would run it: (exit code, out, err)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "records",
        *args,
        cwd=REPO_ROOT,
        env=_child_env(None),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()
