"""Load tests for the idempotency proxy: payment traffic with the duplicates real clients send.

Five user classes, each tagged so it can run alone
(``--tags unique|double_click|retry|tamper|soap``):

* ``unique``: every payment a new order; the backend must charge each exactly once.
* ``double_click``: the same order twice at the same moment through two replicas; one charge,
  the other click gets 409 (still running) or the replay.
* ``retry``: the backend is slow for the order (``X-Sample-Delay``), the client gives up early
  and retries through another replica: 409 while the first runs, then the replay.
* ``tamper``: the same order again with another amount: 422, never a second charge.
* ``soap``: a legacy SOAP client submits one ``/soap/payments`` envelope twice (the second
  re-serialised) through two replicas; the key is the order id inside the envelope: one charge,
  the second submit gets the replay (or 409 while the first still runs).

Targets: ``PROXY_HOSTS`` (comma-separated base URLs) if set, else ``--host``, which may also be
a comma-separated list; each user sticks to one replica, retries and second clicks go to
another. With ``BACKEND_URL`` set (the sample backend), the run ends by reading the ledger:
any order of this load test charged more than once, or any status a user class does not
allow, makes locust exit 1. See loadtests/README.md.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import secrets
import socket
import threading
import time
import urllib.request
from collections import Counter
from typing import Any

import gevent
from locust import FastHttpUser, between, events, tag, task
from locust.contrib.fasthttp import FastHttpSession
from locust.env import Environment
from locust.exception import StopTest
from locust.runners import WorkerRunner

logger = logging.getLogger("loadtest")

PAY = "/v1/orders/pay"
SOAP_PAY = "/soap/payments"
SOAP_HEADERS = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"urn:Pay"'}
ORDER_PREFIX = "lt-"
# Unique per process (master, each worker), so order ids never collide across workers or runs.
RUN = f"{ORDER_PREFIX}{secrets.token_hex(4)}"
SLOW_SECONDS = float(os.environ.get("RETRY_SLOW_SECONDS", "1.5"))
CLIENT_TIMEOUT = float(os.environ.get("RETRY_CLIENT_TIMEOUT", "0.5"))
RETRY_POLLS = 20
RETRY_POLL_INTERVAL = 0.25

_orders = itertools.count()
_users = itertools.count()
_lock = threading.Lock()
# (user class, request kind, outcome) -> count; unexpected ones also go to `_unexpected`.
outcomes: Counter[tuple[str, str, str]] = Counter()
_unexpected: Counter[tuple[str, str, str]] = Counter()
_baseline: set[str] = set()


def proxy_hosts(host: str | None) -> list[str]:
    """Base URLs to spread users over: PROXY_HOSTS, else the (comma-separated) --host."""
    raw = os.environ.get("PROXY_HOSTS") or host or ""
    return [h.strip().rstrip("/") for h in raw.split(",") if h.strip()]


def new_order() -> str:
    return f"{RUN}-{next(_orders)}"


def outcome_of(response: Any) -> str:
    """`201`, `replay` (a stored response played back), `409`, ..., `timeout` or `error:X`."""
    status = response.status_code or 0
    if status == 0:
        error = getattr(response, "error", None)
        # geventhttpclient wraps the last error of its (single, max_retries=0) attempt.
        error = getattr(error, "original", None) or error
        if isinstance(error, TimeoutError | socket.timeout | gevent.Timeout):
            return "timeout"
        return f"error:{type(error).__name__}"
    if status in (200, 201) and (response.headers or {}).get("Idempotent-Replayed") == "true":
        return "replay"
    return str(status)


class PaymentUser(FastHttpUser):
    """Shared plumbing: host spreading, the pay call, and per-class allowed outcomes."""

    abstract = True
    wait_time = between(0.05, 0.25)
    story = ""

    def __init__(self, environment: Environment) -> None:
        self.hosts = proxy_hosts(environment.host or self.host)
        if not self.hosts:
            raise StopTest("set --host or PROXY_HOSTS to the proxy replicas' base URLs")
        self.index = next(_users)
        # FastHttpUser builds its client from self.host: give each user one replica.
        self.host = self.hosts[self.index % len(self.hosts)]
        super().__init__(environment)

    def other_host(self, offset: int = 1) -> str:
        """Another replica than this user's own (the same one if there is only one)."""
        return self.hosts[(self.index + offset) % len(self.hosts)]

    def record(self, response: Any, kind: str, allowed: set[str]) -> str:
        """Count the outcome; fail the request if it is not in `allowed`."""
        outcome = outcome_of(response)
        key = (type(self).__name__, kind, outcome)
        with _lock:
            outcomes[key] += 1
            if outcome not in allowed:
                _unexpected[key] += 1
        if outcome in allowed:
            response.success()
        else:
            response.failure(f"unexpected {outcome} (allowed: {', '.join(sorted(allowed))})")
        return outcome

    def pay(
        self,
        kind: str,
        allowed: set[str],
        order: str,
        amount: int,
        *,
        host: str | None = None,
        headers: dict[str, str] | None = None,
        client: FastHttpSession | None = None,
    ) -> str:
        """POST /v1/orders/pay; counts the outcome and fails the request if not in `allowed`."""
        session = client or self.client
        url = f"{host or self.host}{PAY}"
        body = {"order_id": order, "amount": amount, "currency": "EUR"}
        with session.post(
            url,
            json=body,
            headers=headers or {},
            name=f"{PAY} [{self.story}: {kind}]",
            catch_response=True,
        ) as response:
            return self.record(response, kind, allowed)

    def flag(self, kind: str, what: str) -> None:
        """An unexpected sequence (not one status): counted and reported as a failure."""
        with _lock:
            _unexpected[(type(self).__name__, kind, what)] += 1
        self.environment.events.request.fire(
            request_type="CHECK",
            name=f"{self.story}: {kind}",
            response_time=0,
            response_length=0,
            exception=AssertionError(what),
            context={},
        )


class UniquePayer(PaymentUser):
    """A new order every time: each must be charged exactly once."""

    weight = 4
    story = "unique"

    @tag("unique")
    @task
    def pay_new_order(self) -> None:
        self.pay("pay", {"201"}, new_order(), 1000)


class DoubleClicker(PaymentUser):
    """The same order twice at the same moment, through two replicas."""

    weight = 2
    story = "double_click"
    allowed = {"201", "409", "replay"}

    @tag("double_click")
    @task
    def click_twice(self) -> None:
        order = new_order()
        clicks = [
            gevent.spawn(self.pay, "click", self.allowed, order, 2500),
            gevent.spawn(self.pay, "click", self.allowed, order, 2500, host=self.other_host()),
        ]
        gevent.joinall(clicks)
        results = [click.value for click in clicks]
        if results.count("201") > 1:
            self.flag("click", "both clicks executed")


class Retrier(PaymentUser):
    """Slow backend, impatient client: give up, retry during and after the first attempt."""

    weight = 1
    story = "retry"

    def on_start(self) -> None:
        # A second session whose network timeout is the impatient client's.
        self.impatient = FastHttpSession(
            base_url=self.host,
            request_event=self.environment.events.request,
            user=self,
            network_timeout=CLIENT_TIMEOUT,
            connection_timeout=CLIENT_TIMEOUT,
            max_retries=0,
        )

    @tag("retry")
    @task
    def give_up_and_retry(self) -> None:
        order = new_order()
        slow = {"X-Sample-Delay": str(SLOW_SECONDS)}
        # A timeout is the expected end; a 201 only if the machine stalled past the delay.
        self.pay(
            "first, gives up", {"timeout", "201"}, order, 1999, headers=slow, client=self.impatient
        )
        during = self.pay(
            "retry while running", {"409", "replay"}, order, 1999, host=self.other_host()
        )
        final = during
        for attempt in range(RETRY_POLLS):
            if final == "replay":
                break
            time.sleep(RETRY_POLL_INTERVAL)
            final = self.pay(
                "retry after", {"409", "replay"}, order, 1999, host=self.other_host(2 + attempt)
            )
        if final != "replay":
            self.flag("retry after", f"no replay after {RETRY_POLLS} polls (last: {final})")


class Tamperer(PaymentUser):
    """Pays an order, then sends the same order with another amount."""

    weight = 1
    story = "tamper"

    @tag("tamper")
    @task
    def change_the_amount(self) -> None:
        order = new_order()
        self.pay("original", {"201"}, order, 5000)
        self.pay("changed amount", {"422"}, order, 5001, host=self.other_host())


def soap_envelope(order: str, amount: int, *, pretty: bool) -> bytes:
    """A SOAP 1.1 Pay request for the sample backend's /soap/payments."""
    gap = "\n  " if pretty else ""
    return (
        '<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/" '
        f'xmlns:p="urn:idempotency-proxy:sample:payments">{gap}<soap:Body>{gap}<p:Pay>{gap}'
        f"<p:OrderId>{order}</p:OrderId>{gap}<p:Amount>{amount}</p:Amount>{gap}"
        f"<p:Currency>EUR</p:Currency>{gap}</p:Pay>{gap}</soap:Body></soap:Envelope>"
    ).encode()


class SoapPayer(PaymentUser):
    """A legacy SOAP client: one payment submitted twice, the second re-serialised."""

    weight = 1
    story = "soap"

    def soap_pay(self, kind: str, allowed: set[str], order: str, host: str, pretty: bool) -> str:
        with self.client.post(
            f"{host}{SOAP_PAY}",
            data=soap_envelope(order, 3100, pretty=pretty),
            headers=SOAP_HEADERS,
            name=f"{SOAP_PAY} [{self.story}: {kind}]",
            catch_response=True,
        ) as response:
            return self.record(response, kind, allowed)

    @tag("soap")
    @task
    def submit_twice(self) -> None:
        order = new_order()
        self.soap_pay("submit", {"200"}, order, self.host, pretty=False)
        again = self.soap_pay(
            "submit again", {"replay", "409"}, order, self.other_host(), pretty=True
        )
        if again == "200":
            self.flag("submit again", "the second submit executed")


STORIES = {cls.story: cls for cls in (UniquePayer, DoubleClicker, Retrier, Tamperer, SoapPayer)}


# --------------------------------------------------------------------------- checks


def _backend_url() -> str | None:
    url = os.environ.get("BACKEND_URL", "").strip().rstrip("/")
    return url or None


def _ledger(url: str) -> dict[str, Any]:
    # No proxy handler: a developer's HTTP_PROXY must never see this request.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/v1/ledger", timeout=10) as response:
        data: dict[str, Any] = json.load(response)
        return data


def _ours(ledger: dict[str, Any]) -> set[str]:
    """Orders of load tests charged more than once (other traffic on the ledger is not ours)."""
    return {
        str(order)
        for order in ledger.get("orders_charged_more_than_once", [])
        if str(order).startswith(ORDER_PREFIX)
    }


@events.init.add_listener
def _keep_tagged_classes(environment: Environment, **kwargs: Any) -> None:
    """With --tags/--exclude-tags, drop the user classes left without a task.

    Locust would spawn them anyway and each would fail with "No tasks defined".
    """
    options = environment.parsed_options
    tags = set(getattr(options, "tags", None) or ()) or None
    excluded = set(getattr(options, "exclude_tags", None) or ())
    kept = [
        cls
        for cls in environment.user_classes
        if (tags is None or getattr(cls, "story", "") in tags)
        and getattr(cls, "story", "") not in excluded
    ]
    if kept and len(kept) != len(environment.user_classes):
        environment.user_classes[:] = kept


@events.test_start.add_listener
def _remember_ledger(environment: Environment, **kwargs: Any) -> None:
    """Double charges already on the ledger are not this run's."""
    url = _backend_url()
    if url is None or isinstance(environment.runner, WorkerRunner):
        return
    try:
        _baseline.update(_ours(_ledger(url)))
    except OSError as exc:
        logger.warning("cannot read the ledger at %s: %s", url, exc)


@events.quitting.add_listener
def _check(environment: Environment, **kwargs: Any) -> None:
    """Exit 1 on a double charge (ledger) or an outcome a user class does not allow."""
    if isinstance(environment.runner, WorkerRunner):
        return  # workers report failures to the master, which decides
    failed = False
    if outcomes:
        print("\nOutcomes by user class and request (outcome: count):")
        for (user, kind, outcome), count in sorted(outcomes.items()):
            mark = "  <-- unexpected" if (user, kind, outcome) in _unexpected else ""
            print(f"  {user:14} {kind:22} {outcome:8} {count:6}{mark}")
    if _unexpected:
        failed = True
        print(f"FAIL: unexpected outcomes: {dict(_unexpected)}")
    if environment.stats.total.num_failures:
        failed = True  # in distributed runs, the workers' unexpected outcomes arrive as these
    url = _backend_url()
    if url is None:
        print("BACKEND_URL not set: the ledger was not checked for double charges")
    else:
        try:
            ledger = _ledger(url)
        except OSError as exc:
            failed = True
            print(f"FAIL: cannot read the ledger at {url}: {exc}")
        else:
            doubled = sorted(_ours(ledger) - _baseline)
            ours = sum(1 for o in ledger.get("orders", {}) if str(o).startswith(ORDER_PREFIX))
            if doubled:
                failed = True
                print(f"FAIL: {len(doubled)} order(s) charged more than once: {doubled[:10]}")
            else:
                print(f"ledger: {ours} load-test orders charged, none more than once")
    if failed:
        environment.process_exit_code = 1
