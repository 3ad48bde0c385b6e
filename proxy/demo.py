"""`idempotency-proxy demo`: the double-charge stories, straight to the backend and proxied.

Starts a private Redis, the sample payment backend and several proxy replicas, plays four
stories (double click, timeout and retry, legacy SOAP client, burst) first against the backend
and then through the replicas, and prints one table of what the backend's ledger shows.
Everything it starts runs in its own process group and is stopped on the way out: normal end,
error, Ctrl-C or SIGTERM. `Stack` is also what `loadtests/smoke.py` uses to start the same set
of processes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any, Self

import aiohttp
import httpx
import uvicorn
import yaml

from proxy.config import Settings
from proxy.errorformat import problem_name

HOST = "127.0.0.1"
REDIS_HINT = "apt-get install redis-server"

# The routes every replica protects: the natural key on pay-an-order (what stops a double
# click: the client's own random keys would be two keys, two charges), the header elsewhere.
ROUTES: list[dict[str, Any]] = [
    {
        "name": "pay",
        "methods": ["POST"],
        "path": "/v1/orders/pay",
        "key": {"from": "json", "field": "order_id"},
        "required": True,
        # When the backend resets after it may have charged, ask its ledger instead of an
        # operator. (In production `after` exceeds the backend's longest processing time.)
        "status_check": {
            "path": "/v1/orders/{order_id}/status",
            "after": "500ms",
            "backoff": "250ms",
        },
    },
    {
        "name": "charges",
        "methods": ["POST"],
        "path": "/v1/charges",
        "key": {"from": "header", "name": "Idempotency-Key"},
        "required": True,
    },
    # A legacy SOAP gateway: the order id inside the envelope is the key (SOAP 1.1 or 1.2).
    {
        "name": "soap-pay",
        "methods": ["POST"],
        "path": "/soap/payments",
        "key": {
            "from": "xml",
            "path": "/soap:Envelope/soap:Body/p:Pay/p:OrderId",
            "namespaces": {
                "soap": [
                    "http://schemas.xmlsoap.org/soap/envelope/",
                    "http://www.w3.org/2003/05/soap-envelope",
                ],
                "p": "urn:idempotency-proxy:sample:payments",
            },
        },
        "required": True,
    },
]

READY_TIMEOUT = 60.0
STOP_TIMEOUT = 5.0

# The timeout-and-retry story: the backend takes SLOW_SECONDS for this order, the caller
# waits CALLER_TIMEOUT; the double click gets a short delay so both clicks overlap.
SLOW_SECONDS = 1.5
CALLER_TIMEOUT = 0.5
CLICK_DELAY = 0.3
# The slow-then-reset story: the backend charges, takes RESET_AFTER seconds, then resets.
RESET_AFTER = 0.8
BURST_MAX_COPIES = 5
BURST_TAMPER_SHARE = 0.10
BURST_SEED = 20240601
BURST_ORDERS_IN_FLIGHT = 32
# Replicas in `mode: observe` for the third mode; two are enough to cross replicas.
OBSERVERS = 2
# What observe mode counts that enforcement would have answered itself instead of charging
# again: replays, 409s, waits, 422s and outcome-unknown answers.
PREVENTED = frozenset({"replayed", "in_flight", "key_reused", "outcome_unknown", "fenced"})


class DemoError(RuntimeError):
    """Something the demo depends on did not start or answer; the message says what."""


# --------------------------------------------------------------------------- processes


_issued_ports: set[int] = set()


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's choice), never one handed out
    before in this process: the kernel may offer a just-probed port again, and two of our
    children would then race for it."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port not in _issued_ports:
            _issued_ports.add(port)
            return port
    raise DemoError("no free TCP port found")


def redis_available() -> bool:
    """Is there a `redis-server` binary on PATH?"""
    return shutil.which("redis-server") is not None


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when its parent dies hard (kill -9).

    Only from the main thread: the signal fires when the forking *thread* exits, which
    would kill servers started from short-lived worker threads. The test harness
    starts its processes with this too.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return preexec


def child_env() -> dict[str, str]:
    """Our environment, unbuffered, with 127.0.0.1 kept off any HTTP proxy (the test
    harness builds its children's environment on this one)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    hosts = [h for h in env.get("NO_PROXY", env.get("no_proxy", "")).split(",") if h]
    hosts += [h for h in (HOST, "localhost") if h not in hosts]
    env["NO_PROXY"] = env["no_proxy"] = ",".join(hosts)
    return env


_live: set[Child] = set()


def _kill_live() -> None:
    """Last resort at interpreter exit: nothing we started may outlive us."""
    for child in list(_live):
        child.kill()


atexit.register(_kill_live)


class Child:
    """One child process in its own process group (its own session), logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, port: int) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        with self.log_path.open("ab") as log:
            # A new session keeps the terminal's Ctrl-C away from the children: the demo
            # stops them itself, in order, instead of racing them.
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env(),
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        _live.add(self)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DemoError(
                f"{self.name} exited with code {self.proc.returncode}\n{self.log_tail()}"
            )

    def signal_group(self, sig: signal.Signals) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group and reap the child."""
        self.signal_group(signal.SIGKILL)
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(STOP_TIMEOUT)
        _live.discard(self)

    def log_tail(self, limit: int = 4000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"--- {self.name} log ---\n{text[-limit:]}"


def stop_all(children: Sequence[Child], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM every group at once, wait up to `timeout` for all, then SIGKILL what is left.

    Groups get a final SIGKILL even after a clean exit, for any grandchild left behind.
    """
    for child in children:
        if child.running():
            child.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        if child.proc is None:
            continue
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(max(0.0, deadline - time.monotonic()))
    for child in children:
        child.kill()


def _wait_tcp(child: Child, deadline: float) -> None:
    while True:
        child.check_alive()
        try:
            with socket.create_connection((HOST, child.port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name} did not listen on {child.port}\n{child.log_tail()}")
        time.sleep(0.05)


def _wait_http(child: Child, url: str, deadline: float) -> None:
    last = "no answer"
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while True:
            child.check_alive()
            try:
                response = client.get(url)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                last = type(exc).__name__
            if time.monotonic() > deadline:
                raise DemoError(f"{child.name}: GET {url}: {last}\n{child.log_tail()}")
            time.sleep(0.05)


class Stack:
    """Redis, the sample backend and proxy replicas as child processes, stopped by close().

    Shared by the demo and `loadtests/smoke.py`.
    """

    def __init__(self, workdir: Path | None = None, *, error_format: str = "problem") -> None:
        self._own_dir = workdir is None
        # The replicas' format for their own answers; the stories read every preset.
        self.error_format = error_format
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="idempotency-demo-")) if workdir is None else workdir
        )
        self.children: list[Child] = []
        # Started but not yet seen ready: (child, URL that must answer 200, or None for TCP).
        self._pending: list[tuple[Child, str | None]] = []
        self.redis_url: str | None = None
        self.backend_url = ""
        self.proxy_urls: list[str] = []
        self.observer_urls: list[str] = []
        self.observer_admin_urls: list[str] = []

    def _spawn(self, name: str, argv: Sequence[str], port: int) -> Child:
        child = Child(name, argv, self.workdir / f"{name}.log", port)
        self.children.append(child)
        return child.start()

    def start_redis(self) -> str:
        """A private redis-server: no snapshots, no AOF, data in the work dir."""
        port = free_port()
        child = self._spawn(
            "redis",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                HOST,
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            port,
        )
        self._pending.append((child, None))
        self.redis_url = f"redis://{HOST}:{port}/0"
        return self.redis_url

    def start_backend(self) -> str:
        """The sample backend with its own SQLite ledger in the work dir."""
        port = free_port()
        argv = [sys.executable, "-m", "sample_backend", "--host", HOST, "--port", str(port)]
        argv += ["--db", str(self.workdir / "ledger.sqlite3"), "--log-level", "warning"]
        child = self._spawn("backend", argv, port)
        self.backend_url = f"http://{HOST}:{port}"
        self._pending.append((child, f"{self.backend_url}/healthz"))
        return self.backend_url

    def start_proxies(
        self, count: int, *, upstream: str, redis_url: str, mode: str = "enforce"
    ) -> list[str]:
        """`count` replicas of `python -m proxy run`, all on one Redis and the demo routes
        (in `mode: observe`, the observers, whose admin URLs are kept for their metrics)."""
        observe = mode == "observe"
        config = self.workdir / f"proxy-{mode}.yaml"
        defaults = {"error_format": self.error_format, "mode": mode}
        config.write_text(yaml.safe_dump({"defaults": defaults, "routes": ROUTES}, sort_keys=False))
        urls: list[str] = []
        for index in range(count):
            port, admin = free_port(), free_port()
            argv = [sys.executable, "-m", "proxy", "run", "--upstream", upstream]
            argv += ["--host", HOST, "--port", str(port), "--admin-port", str(admin)]
            argv += ["--redis-url", redis_url, "--config", str(config), "--log-level", "warning"]
            name = f"observe-{index + 1}" if observe else f"proxy-{index + 1}"
            child = self._spawn(name, argv, port)
            self._pending.append((child, f"http://{HOST}:{admin}/readyz"))
            urls.append(f"http://{HOST}:{port}")
            if observe:
                self.observer_admin_urls.append(f"http://{HOST}:{admin}")
        if observe:
            self.observer_urls += urls
        else:
            self.proxy_urls += urls
        return urls

    def start_replicated(self, replicas: int, observers: int = 0) -> None:
        """Redis, backend, `replicas` proxies and `observers` observe-mode proxies, ready."""
        redis_url = self.start_redis()
        upstream = self.start_backend()
        # Redis starts in milliseconds; the proxies then find it at their start-up check.
        self.wait_ready()
        self.start_proxies(replicas, upstream=upstream, redis_url=redis_url)
        if observers:
            self.start_proxies(observers, upstream=upstream, redis_url=redis_url, mode="observe")
        self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until everything started so far serves (fails early if a child exits)."""
        deadline = time.monotonic() + timeout
        pending, self._pending = self._pending, []
        for child, url in pending:
            if url is None:
                _wait_tcp(child, deadline)
            else:
                _wait_http(child, url, deadline)

    def describe(self) -> str:
        parts = []
        if self.redis_url:
            parts.append(f"redis {self.redis_url}")
        parts.append(f"backend {self.backend_url}")
        if self.proxy_urls:
            parts.append(f"replicas {' '.join(self.proxy_urls)}")
        if self.observer_urls:
            parts.append(f"observing {' '.join(self.observer_urls)}")
        return " | ".join(parts)

    def close(self) -> None:
        try:
            stop_all(self.children)
        finally:
            if self._own_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --------------------------------------------------------------------------- in-process replicas


class _QuietServer(uvicorn.Server):
    """Several servers share one process: the demo, not each server, owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class _DropMemoryStoreWarning(logging.Filter):
    # Each app warns that the memory store is not shared between replicas; here the five
    # apps do share one instance, and the demo has already said what it runs.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("using the in-process memory store")


@contextlib.asynccontextmanager
async def memory_replicas(
    count: int,
    upstream: str,
    error_format: str = "problem",
    mode: str = "enforce",
    apps: list[Any] | None = None,
) -> AsyncIterator[list[str]]:
    """`count` uvicorn servers on this loop, each a ProxyApp on one shared MemoryStore
    (`apps`, when given, receives the ProxyApps, e.g. to read their metrics)."""
    from proxy import logs
    from proxy.app import ProxyApp
    from proxy.store.memory import MemoryStore

    logs.configure("warning")
    logging.getLogger("idempotency_proxy").addFilter(_DropMemoryStoreWarning())
    store = MemoryStore()
    servers: list[_QuietServer] = []
    tasks: list[asyncio.Task[None]] = []
    urls: list[str] = []
    try:
        for _ in range(count):
            port = free_port()
            settings = Settings.model_validate(
                {
                    "upstream": upstream,
                    "listen": {"host": HOST, "port": port},
                    "admin": {"enabled": False},
                    "defaults": {"error_format": error_format, "mode": mode},
                    "routes": ROUTES,
                    "log_level": "warning",
                }
            )
            app = ProxyApp(settings, store=store)
            if apps is not None:
                apps.append(app)
            config = uvicorn.Config(
                app,
                host=HOST,
                port=port,
                lifespan="on",
                log_config=None,
                log_level="warning",
                access_log=False,
                server_header=False,
                date_header=False,
                timeout_graceful_shutdown=int(STOP_TIMEOUT),
            )
            server = _QuietServer(config)
            servers.append(server)
            tasks.append(asyncio.create_task(server.serve()))
            urls.append(f"http://{HOST}:{port}")
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(server.started for server in servers):
            for task in tasks:
                if task.done():
                    # uvicorn exits (SystemExit) when it cannot bind or start up.
                    raise DemoError("an in-process replica failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise DemoError("in-process replicas did not start in time")
            await asyncio.sleep(0.02)
        yield urls
    finally:
        for server in servers:
            server.should_exit = True
        if tasks:
            await asyncio.wait(tasks, timeout=STOP_TIMEOUT * 2)
        for task in tasks:
            task.cancel()
        await store.close()


# --------------------------------------------------------------------------- stories


@dataclass
class Phase:
    """What one story did in one mode, and what the ledger saw."""

    story: str
    mode: str
    orders: int = 0
    requests: int = 0
    charges: int = 0
    double_charged: int = 0
    fresh: int = 0
    replays: int = 0
    conflicts: int = 0
    mismatches: int = 0
    timeouts: int = 0
    unknowns: int = 0
    other: dict[str, int] = field(default_factory=dict)
    # Observe mode: duplicates that enforcement would have answered itself (no charge).
    would_prevent: int | None = None

    def count(self, outcome: Outcome) -> None:
        self.requests += 1
        if outcome.problem == "outcome-unknown":
            self.unknowns += 1
        elif outcome.status is None:
            if outcome.error == "timeout":
                self.timeouts += 1
            else:
                self.other[outcome.error] = self.other.get(outcome.error, 0) + 1
        elif outcome.replayed:
            self.replays += 1
        elif outcome.status in (200, 201):  # 200: the SOAP endpoint's success
            self.fresh += 1
        elif _in_progress(outcome):
            self.conflicts += 1
        elif _key_reused(outcome):
            self.mismatches += 1
        else:
            name = f"{outcome.status} {outcome.problem}".rstrip()
            self.other[name] = self.other.get(name, 0) + 1


@dataclass(frozen=True)
class Outcome:
    status: int | None
    replayed: bool = False
    error: str = ""
    problem: str = ""


class Player:
    """Sends the stories' requests and reads the ledger."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        backend: str,
        replicas: list[str],
        observers: list[str] | None = None,
        observed: Callable[[], Awaitable[int]] | None = None,
    ) -> None:
        self.session = session
        self.backend = backend
        self.replicas = replicas
        self.observers = observers or []
        # The observers' count of duplicates enforcement would have answered itself.
        self.observed = observed
        self.run = secrets.token_hex(3)

    async def pay(
        self,
        base: str,
        order_id: str,
        amount: int,
        *,
        delay: float | None = None,
        timeout: float = 30.0,
        reset: bool = False,
    ) -> Outcome:
        headers = {"X-Sample-Delay": str(delay)} if delay is not None else {}
        if reset:  # charge, then close the connection without a response byte
            headers["X-Sample-Drop"] = "after"
        body = {"order_id": order_id, "amount": amount, "currency": "EUR"}
        try:
            async with self.session.post(
                f"{base}/v1/orders/pay",
                json=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as response:
                body_bytes = await response.read()
                return Outcome(
                    response.status,
                    response.headers.get("Idempotent-Replayed") == "true",
                    problem=problem_name(response.content_type, body_bytes),
                )
        except TimeoutError:
            return Outcome(None, error="timeout")
        except aiohttp.ClientError as exc:
            return Outcome(None, error=type(exc).__name__)

    async def soap_pay(self, base: str, order_id: str, amount: int, *, pretty: bool) -> Outcome:
        """One SOAP 1.1 Pay envelope, as a legacy client library sends it."""
        from sample_backend.soap import pay_envelope

        body = pay_envelope(order_id, amount, pretty=pretty)
        headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"urn:Pay"'}
        try:
            async with self.session.post(
                f"{base}/soap/payments",
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=30.0),
            ) as response:
                body_bytes = await response.read()
                return Outcome(
                    response.status,
                    response.headers.get("Idempotent-Replayed") == "true",
                    problem=problem_name(response.content_type, body_bytes),
                )
        except TimeoutError:
            return Outcome(None, error="timeout")
        except aiohttp.ClientError as exc:
            return Outcome(None, error=type(exc).__name__)

    async def reset(self) -> None:
        async with self.session.post(f"{self.backend}/v1/ledger/reset") as response:
            if response.status != 204:
                raise DemoError(f"POST /v1/ledger/reset: HTTP {response.status}")

    async def ledger(self) -> dict[str, Any]:
        async with self.session.get(f"{self.backend}/v1/ledger") as response:
            if response.status != 200:
                raise DemoError(f"GET /v1/ledger: HTTP {response.status}")
            data: dict[str, Any] = await response.json()
            return data

    def order(self, story: str, mode: str, n: int) -> str:
        return f"{story}-{mode}-{self.run}-{n}"

    def targets(self, mode: str) -> list[str]:
        if mode == "direct":
            return [self.backend]
        return self.observers if mode == "observe" else self.replicas

    @property
    def modes(self) -> tuple[str, ...]:
        return ("direct", "observe", "proxied") if self.observers else ("direct", "proxied")

    async def phase(self, story: str, mode: str, play: Callable[[Phase], Awaitable[None]]) -> Phase:
        """Play one story in one mode on an empty ledger and read back what it charged."""
        await self.reset()
        phase = Phase(story, mode)
        observing = mode == "observe" and self.observed is not None
        before = await self.observed() if observing and self.observed else 0
        await play(phase)
        ledger = await self.ledger()
        phase.charges = int(ledger["charges"])
        phase.double_charged = int(ledger["double_charged_count"])
        if observing and self.observed is not None:
            phase.would_prevent = await self.observed() - before
        return phase

    async def observed_from(self, admin_urls: Sequence[str]) -> int:
        """The observers' would-be-prevented duplicates, from their /metrics."""
        total = 0
        for url in admin_urls:
            async with self.session.get(f"{url}/metrics") as response:
                if response.status != 200:
                    raise DemoError(f"GET {url}/metrics: HTTP {response.status}")
                total += prevented_in(await response.text())
        return total

    # -- the stories

    async def double_click(self, phase: Phase) -> None:
        """One order paid twice at the same moment, through two different replicas."""
        order = self.order("click", phase.mode, 1)
        targets = self.targets(phase.mode)
        first, second = targets[0], targets[1 % len(targets)]
        phase.orders = 1
        outcomes = await asyncio.gather(
            self.pay(first, order, 4200, delay=CLICK_DELAY),
            self.pay(second, order, 4200, delay=CLICK_DELAY),
        )
        for outcome in outcomes:
            phase.count(outcome)
        say(f"  {phase.mode:8} two clicks -> {', '.join(_label(o) for o in outcomes)}")

    async def timeout_retry(self, phase: Phase) -> None:
        """The backend is slow, the caller gives up and retries, during and after."""
        order = self.order("retry", phase.mode, 1)
        targets = self.targets(phase.mode)
        phase.orders = 1
        started = time.monotonic()
        seen: list[Outcome] = []

        async def attempt(base: str) -> Outcome:
            outcome = await self.pay(base, order, 1999, delay=SLOW_SECONDS, timeout=CALLER_TIMEOUT)
            phase.count(outcome)
            seen.append(outcome)
            return outcome

        await attempt(targets[0])  # gives up after CALLER_TIMEOUT; the backend goes on
        await attempt(targets[1 % len(targets)])  # while the first is still running
        # Then once the first has surely finished; on a slow machine the proxy may still
        # say 409, so poll a bounded number of times as a real client would.
        await asyncio.sleep(max(0.0, SLOW_SECONDS + 0.3 - (time.monotonic() - started)))
        for tries in range(40):
            outcome = await attempt(targets[(2 + tries) % len(targets)])
            if not _in_progress(outcome):
                break
            await asyncio.sleep(0.25)
        say(f"  {phase.mode:8} attempts -> {', '.join(_label(o) for o in seen)}")

    async def legacy_soap(self, phase: Phase) -> None:
        """A SOAP client submits one payment, times out in its head and submits it again,
        re-serialised (pretty-printed) by its library, through another replica."""
        order = self.order("soap", phase.mode, 1)
        targets = self.targets(phase.mode)
        phase.orders = 1
        seen = [
            await self.soap_pay(targets[0], order, 3100, pretty=False),
            await self.soap_pay(targets[1 % len(targets)], order, 3100, pretty=True),
        ]
        for outcome in seen:
            phase.count(outcome)
        say(f"  {phase.mode:8} two submits -> {', '.join(_label(o) for o in seen)}")

    async def slow_then_reset(self, phase: Phase) -> None:
        """The backend charges, is slow, then resets the connection: nobody saw an answer.
        The client retries (bounded) until it gets one."""
        order = self.order("reset", phase.mode, 1)
        targets = self.targets(phase.mode)
        phase.orders = 1
        seen = [await self.pay(targets[0], order, 2500, delay=RESET_AFTER, reset=True)]
        for tries in range(40):
            outcome = await self.pay(targets[(1 + tries) % len(targets)], order, 2500)
            seen.append(outcome)
            # Straight to the backend, the retry is answered (by a second charge); through
            # the proxies, outcome-unknown until the status check found the one charge.
            if outcome.problem != "outcome-unknown" and not _in_progress(outcome):
                break
            await asyncio.sleep(0.25)
        for outcome in seen:
            phase.count(outcome)
        shown = [_label(o) for o in seen]
        if len(shown) > 4:
            shown = [*shown[:2], f"... ({len(shown) - 3} more)", shown[-1]]
        say(f"  {phase.mode:8} attempts -> {', '.join(shown)}")

    async def burst(self, phase: Phase, orders: int) -> None:
        """Many orders, each sent 1 to 5 times at once across random replicas; ~10% of them
        with one copy whose amount was tampered with."""
        rng = random.Random(BURST_SEED)
        targets = self.targets(phase.mode)
        phase.orders = orders
        plan: list[list[tuple[str, int]]] = []
        for _ in range(orders):
            amount = rng.randint(100, 99_999)
            tampered = rng.random() < BURST_TAMPER_SHARE
            copies = rng.randint(2 if tampered else 1, BURST_MAX_COPIES)
            # Replica picks use the replica count in both modes, so that the direct and the
            # proxied phase play exactly the same orders, copies and amounts.
            sends = [
                (targets[rng.randrange(len(self.replicas)) % len(targets)], amount)
                for _ in range(copies)
            ]
            if tampered:
                index = rng.randrange(copies)
                sends[index] = (sends[index][0], amount + 1)
            plan.append(sends)
        done = 0
        progress = Progress(f"  {phase.mode:8} burst", orders)
        gate = asyncio.Semaphore(BURST_ORDERS_IN_FLIGHT)

        async def one(n: int, sends: list[tuple[str, int]]) -> None:
            nonlocal done
            order = self.order("burst", phase.mode, n)
            async with gate:
                outcomes = await asyncio.gather(*(self.pay(b, order, a) for b, a in sends))
            for outcome in outcomes:
                phase.count(outcome)
            done += 1
            progress.update(done)

        await asyncio.gather(*(one(n, sends) for n, sends in enumerate(plan)))
        progress.finish()


def prevented_in(metrics: str) -> int:
    """Sum of `idempotency_proxy_observed_total` samples whose `would` is a duplicate that
    enforcement would have answered itself, in a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(metrics):
        if family.name == "idempotency_proxy_observed":
            total += sum(s.value for s in family.samples if s.labels.get("would") in PREVENTED)
    return int(total)


def _in_progress(outcome: Outcome) -> bool:
    # By name, whatever status the error format gives it; a bare 409 straight from a
    # backend counts too.
    return outcome.problem == "request-in-progress" or (
        outcome.status == 409 and not outcome.problem
    )


def _key_reused(outcome: Outcome) -> bool:
    return outcome.problem == "key-reused" or (outcome.status == 422 and not outcome.problem)


def _label(outcome: Outcome) -> str:
    if outcome.status is None:
        return outcome.error
    if outcome.replayed:
        return f"{outcome.status} replayed"
    if _in_progress(outcome):
        return f"{outcome.status} in progress"
    if _key_reused(outcome):
        return f"{outcome.status} key reused"
    if outcome.problem:
        return f"{outcome.status} {outcome.problem}"
    return {200: "200 charged", 201: "201 charged"}.get(outcome.status, str(outcome.status))


class Progress:
    """One line rewritten in place on a terminal; a line per quarter otherwise."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.tty = sys.stdout.isatty()
        self.quarter = 0

    def update(self, done: int) -> None:
        if self.tty:
            sys.stdout.write(f"\r{self.label}: {done}/{self.total} orders")
            sys.stdout.flush()
            return
        quarter = done * 4 // self.total
        if quarter > self.quarter:
            self.quarter = quarter
            say(f"{self.label}: {done}/{self.total} orders ({quarter * 25}%)")

    def finish(self) -> None:
        if self.tty:
            sys.stdout.write("\n")
            sys.stdout.flush()


def say(text: str) -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- the table

COLUMNS = (
    ("story", "<"),
    ("mode", "<"),
    ("orders", ">"),
    ("requests", ">"),
    ("backend charges", ">"),
    ("charged twice", ">"),
    ("replays", ">"),
    ("409s", ">"),
    ("422s", ">"),
    ("timeouts", ">"),
    ("unknown", ">"),
    ("other", ">"),
    ("would prevent", ">"),
)


def table(phases: Sequence[Phase]) -> str:
    rows = [[name for name, _ in COLUMNS]]
    for p in phases:
        other = sum(p.other.values())
        rows.append(
            [
                p.story,
                p.mode,
                str(p.orders),
                str(p.requests),
                str(p.charges),
                str(p.double_charged),
                str(p.replays),
                str(p.conflicts),
                str(p.mismatches),
                str(p.timeouts),
                str(p.unknowns),
                str(other),
                "-" if p.would_prevent is None else str(p.would_prevent),
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]

    def line(row: list[str]) -> str:
        cells = [
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(row, COLUMNS, widths, strict=True)
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule, *(line(row) for row in rows[1:])])


# --------------------------------------------------------------------------- main


async def _play(player: Player, orders: int) -> list[Phase]:
    phases: list[Phase] = []
    stories: list[tuple[str, str, Callable[[Phase], Awaitable[None]]]] = [
        ("double click", "one order paid twice at the same moment", player.double_click),
        (
            "timeout+retry",
            f"backend takes {SLOW_SECONDS}s, caller gives up after {CALLER_TIMEOUT}s and "
            "retries while it runs and after",
            player.timeout_retry,
        ),
        (
            "legacy SOAP",
            "a SOAP client submits one payment twice, the second re-serialised",
            player.legacy_soap,
        ),
        (
            "slow+reset",
            f"backend charges, takes {RESET_AFTER}s, then resets the connection; the client "
            "retries until it has an answer",
            player.slow_then_reset,
        ),
        (
            "burst",
            f"{orders} orders, each sent 1-{BURST_MAX_COPIES} times at once, "
            f"~{BURST_TAMPER_SHARE:.0%} with one tampered amount",
            lambda phase: player.burst(phase, orders),
        ),
    ]
    for story, description, play in stories:
        say(f"{story}: {description}")
        for mode in player.modes:
            phases.append(await player.phase(story, mode, play))
    return phases


async def _stories(stack: Stack, replicas: int, orders: int, memory: bool) -> list[Phase]:
    """The stories, with SIGTERM cancelling them as Ctrl-C does (asyncio.Runner's way).

    Raising from a signal handler in the middle of the event loop would skip the
    graceful shutdown of the in-process replicas; cancelling the main task does not.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    hooked = task is not None and threading.current_thread() is threading.main_thread()
    if hooked and task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    try:
        return await _stories_unguarded(stack, replicas, orders, memory)
    finally:
        if hooked:
            loop.remove_signal_handler(signal.SIGTERM)
            signal.signal(signal.SIGTERM, _terminate)


async def _stories_unguarded(stack: Stack, replicas: int, orders: int, memory: bool) -> list[Phase]:
    connector = aiohttp.TCPConnector(limit=128)
    # trust_env defaults to False: a developer's HTTP_PROXY must not see 127.0.0.1 traffic.
    async with aiohttp.ClientSession(connector=connector) as session:
        if not memory:
            player = Player(session, stack.backend_url, stack.proxy_urls, stack.observer_urls)
            player.observed = lambda: player.observed_from(stack.observer_admin_urls)
            return await _play(player, orders)
        apps: list[Any] = []
        async with (
            memory_replicas(replicas, stack.backend_url, stack.error_format) as urls,
            memory_replicas(
                OBSERVERS, stack.backend_url, stack.error_format, "observe", apps
            ) as observers,
        ):
            say(f"in-process replicas: {' '.join(urls)}; observing: {' '.join(observers)}")

            async def observed() -> int:
                return sum(prevented_in(app.metrics.render().decode()) for app in apps)

            player = Player(session, stack.backend_url, urls, observers, observed)
            result: list[Phase] = await _play(player, orders)
            return result


def _terminate(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same way out as Ctrl-C, so every finally block runs.
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises KeyboardInterrupt, so cleanup runs as for Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(
    orders: int = 200, replicas: int = 5, memory: bool = False, error_format: str = "problem"
) -> int:
    """Run the demo; 0 when no order was charged twice through the proxies."""
    if orders < 1 or replicas < 2:
        print("demo: --orders must be at least 1 and --replicas at least 2", file=sys.stderr)
        return 2
    if memory:
        say(
            f"--memory: running the {replicas} replicas inside this process on one shared "
            f"memory store (leave out --memory to use redis-server; {REDIS_HINT})"
        )
    elif not redis_available():
        memory = True
        say(
            f"redis-server not found: running the {replicas} replicas inside this process on "
            f"one shared memory store; for real replica processes: {REDIS_HINT}"
        )
    started = time.monotonic()
    with sigterm_as_interrupt():
        stack = Stack(error_format=error_format)
        try:
            if memory:
                stack.start_backend()
                stack.wait_ready()
            else:
                stack.start_replicated(replicas, OBSERVERS)
            say(f"started: {stack.describe()}")
            phases = asyncio.run(_stories(stack, replicas, orders, memory))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("\ninterrupted: stopping everything the demo started", file=sys.stderr)
            return 130
        except DemoError as exc:
            print(f"demo: {exc}", file=sys.stderr)
            return 1
        finally:
            stack.close()
    say("")
    say(table(phases))
    say("")
    return _verdict(phases, time.monotonic() - started)


def _verdict(phases: Sequence[Phase], seconds: float) -> int:
    direct = sum(p.double_charged for p in phases if p.mode == "direct")
    proxied = [p for p in phases if p.mode == "proxied"]
    doubled = sum(p.double_charged for p in proxied)
    unexpected = {k: v for p in proxied for k, v in p.other.items()}
    if unexpected:
        say(f"note: unexpected answers through the proxies: {unexpected}")
    if doubled:
        say(f"FAIL: {doubled} order(s) charged more than once through the proxies")
        return 1
    observed = [p for p in phases if p.mode == "observe"]
    if observed:
        would = sum(p.would_prevent or 0 for p in observed)
        say(
            f"observe: charged as straight to the backend "
            f"({sum(p.double_charged for p in observed)} order(s) charged more than once); "
            f"enforcing would have prevented {would} duplicate charge(s)"
        )
    say(
        f"OK: {direct} order(s) charged more than once straight to the backend, "
        f"none through the proxies ({seconds:.1f}s)"
    )
    return 0
