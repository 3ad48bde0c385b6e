"""`idempotency-proxy demo`: the double-charge stories, straight to the backend and proxied.

Starts a private Redis, the sample payment backend and several proxy replicas (a
`devstack.stack.Stack`), plays four stories (double click, timeout and retry, legacy SOAP
client, burst) first against the backend and then through the replicas, and prints one table
of what the backend's ledger shows. Everything it starts runs in its own process group and is
stopped on the way out: normal end, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import uvicorn

from devstack.processes import (
    HOST,
    StackError,
    free_port,
    sigterm_as_interrupt,
    terminate_as_interrupt,
)
from devstack.servers import REDIS_HINT, redis_binaries_missing
from devstack.stack import READY_TIMEOUT, ROUTES, STOP_TIMEOUT, Stack
from proxy.config import Settings
from proxy.errorformat import problem_name
from sample_backend.soap import pay_envelope

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


class DemoError(StackError):
    """Something the demo depends on did not start or answer; the message says what."""


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
    from proxy.server import uvicorn_config
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
            # The production server's options (protocol, head bounds, headers), with the
            # demo's shorter drain.
            config = uvicorn_config(
                app,
                HOST,
                port,
                settings,
                lifespan="on",
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
            signal.signal(signal.SIGTERM, terminate_as_interrupt)


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
    elif redis_binaries_missing("redis-server"):
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
        except StackError as exc:
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
