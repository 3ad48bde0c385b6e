"""Several worker processes on one port, and one admin port that speaks for all of them.

uvicorn's supervisor runs the workers; each worker is a whole proxy (store client, breaker,
replay cache, metrics) with nothing shared but Redis. So each worker serves its own admin
app on a unix socket in a private directory, and the supervisor's admin port asks every
worker: `/readyz` is ready when all workers are, `/metrics` is every worker's series with a
`worker` label (sum them for the pod, as with replicas), `/livez` fails for a stuck worker.

A worker finds its number by locking the first free `worker-N.lock` in that directory: a
worker that uvicorn starts again after a crash takes the number of the one it replaces, so
the label set stays `worker="0"`..`worker="N-1"`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import inspect
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

import httpx
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from proxy import tracing
from proxy.admin import create_admin_app
from proxy.app import ProxyApp
from proxy.config import Settings

logger = logging.getLogger("idempotency_proxy")

# Where a worker finds the private directory (the only thing the environment carries: the
# settings, secrets included, are in a 0600 file there, not in any process's environment).
ADMIN_DIR_ENV = "IDEMPOTENCY_PROXY__WORKER_DIR"
SETTINGS_FILE = "settings.json"
# How long the supervisor's admin port waits for one worker's answer, all of it: a probe's
# timeout (2 s in the manifests) must still get the answer that names the worker.
WORKER_ANSWER_SECONDS = 0.8
# A worker that has not answered /livez for this long is stuck (its event loop blocked:
# uvicorn's own health check is answered from another thread): the supervisor's /livez
# fails, and the orchestrator restarts the process.
STUCK_SECONDS = 30.0
# The longest unix socket path (sun_path is 108 bytes with its NUL on Linux; 104 elsewhere).
_MAX_SOCKET_PATH = 100


# -- the supervisor ---------------------------------------------------------------------


def run_workers(settings: Settings, options: dict[str, Any]) -> None:
    """Run `settings.workers` workers on the traffic port (uvicorn's supervisor, which
    restarts a worker that dies) and, unless disabled, the admin port in this process.
    Exits 3, as one worker would, when a worker fails to start."""
    admin_dir = _private_dir()
    try:
        _serve_workers(settings, options, admin_dir)
    finally:
        shutil.rmtree(admin_dir, ignore_errors=True)


def _private_dir() -> str:
    """A new 0700 directory whose sockets' paths fit a unix socket address."""
    admin_dir = tempfile.mkdtemp(prefix="idempotency-proxy-")
    if len(_socket_path(admin_dir, 999)) <= _MAX_SOCKET_PATH:
        return admin_dir
    os.rmdir(admin_dir)  # TMPDIR is too deep for a socket path
    return tempfile.mkdtemp(prefix="idempotency-proxy-", dir="/tmp")


def _serve_workers(settings: Settings, options: dict[str, Any], admin_dir: str) -> None:
    # The secret file was read already; the workers get its contents, not the path again.
    descriptor = os.open(os.path.join(admin_dir, SETTINGS_FILE), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        file.write(settings.model_dump_json(by_alias=True, exclude={"key_hash_secret_file"}))
    os.environ[ADMIN_DIR_ENV] = admin_dir
    config = uvicorn.Config(
        "proxy.workers:worker_app",
        factory=True,
        host=settings.listen.host,
        port=settings.listen.port,
        workers=settings.workers,
        lifespan="on",
        **options,
    )
    supervisor: Multiprocess | None = None

    def shutting_down() -> bool:
        return supervisor is not None and supervisor.should_exit.is_set()

    admin: _AdminThread | None = None
    if settings.admin.enabled:
        app = create_workers_admin_app(admin_dir, settings.workers, shutting_down)
        admin = _AdminThread(
            uvicorn.Config(
                app, host=settings.admin.host, port=settings.admin.port, lifespan="off", **options
            )
        )
    try:
        supervisor = _supervisor(config)
        if admin is not None:
            admin.start()
        supervisor.run()
    finally:
        if admin is not None:
            admin.stop()
    if any(process.exitcode == STARTUP_FAILURE for process in supervisor.processes):
        # uvicorn's supervisor stops when a worker cannot start, and returns as after a
        # signal: the process must not look like a clean stop to whoever restarts it.
        raise SystemExit(STARTUP_FAILURE)


def _supervisor(config: uvicorn.Config) -> Multiprocess:
    """uvicorn's supervisor on the bound traffic socket. (Older uvicorn versions also take
    the worker's entry point, which newer ones make themselves.)"""
    sockets = [config.bind_socket()]
    if "target" in inspect.signature(Multiprocess).parameters:
        return _Supervisor(config, target=uvicorn.Server(config).run, sockets=sockets)  # type: ignore[call-arg]
    return _Supervisor(config, sockets=sockets)


class _Supervisor(Multiprocess):
    """uvicorn's supervisor without its reload and resize signals (SIGHUP, SIGTTIN,
    SIGTTOU): they would start workers beside the N the admin port numbers and asks, and
    leave it not ready for good. Change the count with a restart, as with one worker."""

    def _refuse(self, signal_name: str) -> None:
        logger.warning(
            f"{signal_name} ignored: restart the proxy to change or renew its workers",
            extra={"workers": self.processes_num},
        )

    def handle_hup(self) -> None:
        self._refuse("SIGHUP")

    def handle_ttin(self) -> None:
        self._refuse("SIGTTIN")

    def handle_ttou(self) -> None:
        self._refuse("SIGTTOU")


class _AdminThread:
    """The supervisor's admin server, on a thread of its own: the main thread belongs to
    uvicorn's supervisor, which watches the workers and takes the signals."""

    def __init__(self, config: uvicorn.Config) -> None:
        # Bound here, before any worker starts: a port in use ends start-up with one line.
        sockets = [config.bind_socket()]
        self._server = _QuietSignals(config)
        self._thread = threading.Thread(
            target=self._server.run, args=(sockets,), name="admin", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)


class _QuietSignals(uvicorn.Server):
    """A server that leaves the signals to whoever owns the process's lifetime."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def create_workers_admin_app(
    admin_dir: str, workers: int, shutting_down: Callable[[], bool]
) -> Starlette:
    """The admin port of a process with several workers: every answer asks the workers."""

    # When each worker last answered /livez; the admin port's start counts as an answer,
    # so that starting workers have STUCK_SECONDS to come up.
    started = time.monotonic()
    alive = dict.fromkeys((str(number) for number in range(workers)), started)

    async def livez(request: Request) -> Response:
        # uvicorn's supervisor restarts a worker that dies; one whose event loop is stuck
        # it does not see, so that one fails liveness here, as a single worker would.
        now = time.monotonic()
        for number, answer in (await _ask_workers(admin_dir, workers, "/livez")).items():
            if answer is not None and answer.status_code == 200:
                alive[number] = now
        stuck = sorted(number for number, seen in alive.items() if now - seen > STUCK_SECONDS)
        if stuck:
            return JSONResponse({"status": "stuck", "workers": stuck}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if shutting_down():
            return JSONResponse({"status": "draining"}, status_code=503)
        answers = await _ask_workers(admin_dir, workers, "/readyz")
        states = {number: _state(answer) for number, answer in answers.items()}
        ready = all(state == "ready" for state in states.values())
        status = "ready" if ready else "starting"
        return JSONResponse(
            {"status": status, "workers": states}, status_code=200 if ready else 503
        )

    async def metrics(request: Request) -> Response:
        answers = await _ask_workers(admin_dir, workers, "/metrics")
        texts = {
            number: answer.text if answer is not None and answer.status_code == 200 else None
            for number, answer in answers.items()
        }
        registry = CollectorRegistry()
        registry.register(_Merged(texts))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/livez", livez),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )


async def _ask_workers(admin_dir: str, workers: int, path: str) -> dict[str, httpx.Response | None]:
    """Each worker's answer to `path` (None: no answer in time), by worker number."""

    async def ask(number: int) -> httpx.Response | None:
        transport = httpx.AsyncHTTPTransport(uds=_socket_path(admin_dir, number))
        try:
            async with (
                asyncio.timeout(WORKER_ANSWER_SECONDS),
                httpx.AsyncClient(transport=transport, base_url="http://worker") as client,
            ):
                return await client.get(path)
        except (httpx.HTTPError, TimeoutError):
            return None  # starting, restarting, stuck or gone: the caller says so

    answers = await asyncio.gather(*(ask(number) for number in range(workers)))
    return {str(number): answer for number, answer in enumerate(answers)}


def _state(answer: httpx.Response | None) -> str:
    """A worker's readiness as its /readyz says it."""
    if answer is None:
        return "unreachable"
    try:
        return str(answer.json()["status"])
    except (ValueError, KeyError, TypeError):
        return f"answered {answer.status_code}"


class _Merged(Collector):
    """The workers' expositions as one, each sample labelled with its worker's number, and
    `idempotency_proxy_worker_up` saying which workers answered (None: no exposition)."""

    def __init__(self, texts: dict[str, str | None]) -> None:
        self._texts = texts

    def describe(self) -> Iterable[Any]:
        return ()  # names are known only when collected; one collector, no clashes

    def collect(self) -> Iterable[Any]:
        up = GaugeMetricFamily(
            "idempotency_proxy_worker_up",
            "1 when the worker answered this scrape; its series are missing otherwise.",
            labels=["worker"],
        )
        families: dict[str, Any] = {up.name: up}
        for number, text in self._texts.items():
            up.add_metric([number], 0.0 if text is None else 1.0)
            if text is None:
                continue
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, family)
                samples = [
                    s._replace(labels={**s.labels, "worker": number}) for s in family.samples
                ]
                if merged is family:
                    family.samples = samples
                else:
                    merged.samples.extend(samples)
        return families.values()


# -- a worker ---------------------------------------------------------------------------

# The worker's number lock: held (open) for the process's life, released by its end.
_number_lock: IO[str] | None = None


def worker_app() -> ProxyApp:
    """The app factory each worker process calls."""
    from proxy import logs

    admin_dir = os.environ[ADMIN_DIR_ENV]
    with open(os.path.join(admin_dir, SETTINGS_FILE), encoding="utf-8") as file:
        settings = Settings.model_validate_json(file.read())
    logs.configure(settings.log_level)
    if not settings.admin.enabled:
        return ProxyApp(settings, tracing=tracing.from_environment())
    return WorkerApp(settings, admin_dir, tracing=tracing.from_environment())


class WorkerApp(ProxyApp):
    """A worker's proxy, with its admin app on the worker's unix socket for the supervisor."""

    def __init__(self, settings: Settings, admin_dir: str, **kwargs: Any) -> None:
        super().__init__(settings, **kwargs)
        self._admin_dir = admin_dir
        self._admin: _QuietSignals | None = None
        self._admin_task: asyncio.Task[None] | None = None

    async def startup(self) -> None:
        number = _take_number(self._admin_dir)
        path = _socket_path(self._admin_dir, number)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by the worker this one replaces
        app = create_admin_app(self, lambda: False)
        self._admin = _QuietSignals(
            uvicorn.Config(app, uds=path, lifespan="off", log_config=None, access_log=False)
        )
        self._admin_task = asyncio.create_task(self._admin.serve())
        # Serving before the proxy starts, or the worker does not start at all: a worker
        # the supervisor cannot ask would keep the process not ready without a word.
        while not self._admin.started:
            if self._admin_task.done():
                raise RuntimeError(f"the worker's admin socket {path} could not be served")
            await asyncio.sleep(0.01)
        await super().startup()

    async def shutdown(self) -> None:
        # Until the end: the supervisor still reads this worker's metrics while it drains.
        await super().shutdown()
        if self._admin is not None and self._admin_task is not None:
            self._admin.should_exit = True
            await self._admin_task


def _take_number(admin_dir: str) -> int:
    """The lowest worker number no live worker holds."""
    global _number_lock
    for number in itertools.count():
        handle = open(os.path.join(admin_dir, f"worker-{number}.lock"), "w")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _number_lock = handle
        return number
    raise AssertionError("unreachable")


def _socket_path(admin_dir: str, number: int) -> str:
    return os.path.join(admin_dir, f"worker-{number}.sock")
