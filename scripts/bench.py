#!/usr/bin/env python3
"""The proxy's benchmark: the same load against the backend and through the proxy, in one run.

One run on one machine starts a private Redis (no persistence), a backend with one
worker (by default the trivial one, scripts/bench_backend.py, which answers 201 at
once so the proxy's own cost shows; `--backend sample` for the sample backend and its
SQLite ledger), and the proxy with one worker (a header-keyed route on
`POST /v1/charges`), then drives the same `POST /v1/charges` load at:

  direct   the backend itself (the baseline every ratio divides by)
  miss     the proxy, a new Idempotency-Key per request (claim, forward, complete)
  replay   the proxy, a small set of keys that are already COMPLETED
  storm    the proxy, every request of a round on one fresh key: the first one
           executes, the ones that arrive while it runs get 409, the rest replay
  miss-mem the miss path through a proxy on the in-process memory store: the same
           story without a store round trip, so the difference to `miss` is what the
           two round trips on the client's path cost
  miss-aiohttp, miss-httpx  (--transports) the miss path through proxies whose
           upstream client is aiohttp or httpx, to compare them with the built-in one
  miss-json  (--keys) the miss path on a route keyed by a JSON body field
           (`POST /v1/orders/pay`, `order_id`), a new order per request
  miss-xml   (--keys) the same on a SOAP route keyed by an XML element
           (`POST /soap/payments`, the envelope's `p:OrderId`): what an XML
           route costs next to a JSON route
  miss-w2  (--two-workers) the miss path through a proxy started with `--workers 2`
  miss-cand, replay-cand  (--candidate DIR) the same paths through a proxy run from
           another checkout, interleaved with this one: what a change gains

at 1 and 32 connections, in interleaved rounds (every scenario once per round,
the order rotated each round), and reports the median of the rounds. Next to the
throughput and latency of each scenario it reports the CPU per request of the proxy's
own processes, the backend's and Redis's (utime + stime from /proc/PID/stat around each
round, divided by the answers), and judges the targets on the proxy's CPU per request.

A round only counts when every answer was 201 (or 409 in the storm) and the
backend's ledger shows the executions the scenario implies: as many charges as
201s on the direct and miss paths, none while replaying, exactly one per storm.

Load comes from wrk with a Lua script (unique keys: thread id + counter); without
wrk a bounded asyncio (aiohttp) generator stands in, which is much slower itself.

    .venv/bin/python scripts/bench.py [--duration S] [--rounds N] [--write docs/benchmarks.md]
                                      [--quick] [--no-transports] [--no-two-workers] [--pin]
                                      [--profile DIR] [--backend trivial|sample]
                                      [--candidate DIR] [--only NAMES]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# This checkout's `proxy`, as the processes it starts use, also for the in-process parts.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

import bench_report  # noqa: E402
from bench_store import measure_store  # noqa: E402

from devstack.processes import (  # noqa: E402
    ManagedProcess,
    StackError,
    child_env,
    die_with_parent,
    free_port,
    stop_all,
)
from devstack.servers import redis_command  # noqa: E402

HOST = "127.0.0.1"
READY_TIMEOUT = 60.0
PATH = "/v1/charges"
BODY = b'{"amount":100,"currency":"EUR"}'
# The natural-key scenarios: a route keyed by a JSON field and one keyed by an XML element.
JSON_KEY_PATH = "/v1/orders/pay"
XML_KEY_PATH = "/soap/payments"
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
PAYMENTS_NS = "urn:idempotency-proxy:sample:payments"
PATHS = {"json-key": JSON_KEY_PATH, "xml-key": XML_KEY_PATH}


def request_for(mode: str, key: str) -> tuple[str, bytes, dict[str, str]]:
    """Path, body and headers of one request of a scenario's key pattern."""
    if mode == "json-key":
        body = f'{{"order_id":"{key}","amount":100,"currency":"EUR"}}'.encode()
        return JSON_KEY_PATH, body, {"Content-Type": "application/json"}
    if mode == "xml-key":
        return XML_KEY_PATH, soap_body(key), {"Content-Type": "text/xml; charset=utf-8"}
    return PATH, BODY, {"Content-Type": "application/json", "Idempotency-Key": key}


def soap_body(order: str) -> bytes:
    # A typical client's envelope: a declaration, line breaks and indentation.
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<soap:Envelope xmlns:soap="{SOAP11_NS}" xmlns:p="{PAYMENTS_NS}">\n'
        f"  <soap:Body>\n    <p:Pay>\n      <p:OrderId>{order}</p:OrderId>\n"
        "      <p:Amount>100</p:Amount>\n      <p:Currency>EUR</p:Currency>\n"
        "    </p:Pay>\n  </soap:Body>\n</soap:Envelope>\n"
    ).encode()


REPLAY_KEYS = 16
CONNECTIONS = (1, 32)
# The upstream client every scenario uses (the proxy's default), and the ones --transports
# compares with it on the miss path.
DEFAULT_CLIENT = "builtin"
OTHER_CLIENTS = ("aiohttp", "httpx")
# A client timeout far above any healthy latency: a timeout here means the run is invalid.
CLIENT_TIMEOUT_S = 10
# Hard cap on one aiohttp worker's requests per round, so even its loop is bounded by count.
MAX_REQUESTS_PER_WORKER = 1_000_000

TARGETS = {
    # The proxy's own CPU per request (its processes' utime + stime over a round, divided by
    # the answers of that round), judged at 32 connections where throughput is the question.
    "miss_cpu_us": 600.0,
    "replay_cpu_us": 120.0,
    "added_p50_ms": 0.8,  # proxy p50 - direct p50 on the miss path at 1 connection
    "rss_mb": 80.0,  # the proxy's VmRSS after the run
}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The wrk script. `mode prefix nkeys` come after `--` on wrk's command line. Globals (not
# locals) because done() reads each thread's status counts with thread:get().
WRK_LUA = r"""
local threads = {}
local started = 0

function setup(thread)
  started = started + 1
  thread:set("tid", started)
  table.insert(threads, thread)
end

statuses = {}
counter = 0

function init(args)
  mode = args[1]
  prefix = args[2]
  nkeys = tonumber(args[3]) or 1
  wrk.method = "POST"
  wrk.body = '{"amount":100,"currency":"EUR"}'
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  counter = counter + 1
  local key
  if mode == "json-key" or mode == "xml-key" then
    key = prefix .. "-" .. tid .. "-" .. counter
    if mode == "json-key" then
      return wrk.format(nil, "JSON_KEY_PATH", {["Content-Type"] = "application/json"},
        '{"order_id":"' .. key .. '","amount":100,"currency":"EUR"}')
    end
    return wrk.format(nil, "XML_KEY_PATH", {["Content-Type"] = "text/xml; charset=utf-8"},
      'SOAP_HEAD' .. key .. 'SOAP_TAIL')
  end
  if mode == "replay" then
    key = prefix .. "-" .. (counter % nkeys)
  elseif mode == "storm" then
    key = prefix
  else
    key = prefix .. "-" .. tid .. "-" .. counter
  end
  wrk.headers["Idempotency-Key"] = key
  return wrk.format()
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local merged = {}
  for _, thread in ipairs(threads) do
    local counts = thread:get("statuses") or {}
    for code, n in pairs(counts) do
      merged[code] = (merged[code] or 0) + n
    end
  end
  local parts = {}
  for code, n in pairs(merged) do
    parts[#parts + 1] = string.format('"%d":%d', code, n)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%.0f,"p50_us":%.0f,"p99_us":%.0f,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect, e.read, e.write, e.timeout, table.concat(parts, ",")))
end
"""


def key_cpu_us(iterations: int = 2000) -> dict[str, float]:
    """In this process: microseconds of CPU to read the key and fingerprint one request, for
    a JSON-field route and an XML-element route (the part of the proxy an XML route changes;
    the load scenarios also pay the backend's own parsing)."""
    from proxy.config import KeySpec
    from proxy.fingerprint import fingerprint
    from proxy.keys import extract
    from proxy.request import ProxyRequest

    specs = {
        "json": KeySpec.model_validate({"from": "json", "field": "order_id"}),
        "xml": KeySpec.model_validate(
            {
                "from": "xml",
                "path": "/soap:Envelope/soap:Body/p:Pay/p:OrderId",
                "namespaces": {"soap": SOAP11_NS, "p": PAYMENTS_NS},
            }
        ),
    }
    out: dict[str, float] = {}
    for name, spec in specs.items():
        path, body, headers = request_for(f"{name}-key", "order-1234567890")
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        started = time.process_time()
        for _ in range(iterations):
            request = ProxyRequest("POST", path, path.encode(), b"", raw, body)
            extract(request, spec, {}, True)
            fingerprint(request)
        out[name] = (time.process_time() - started) / iterations * 1e6
    return out


def _lua_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def wrk_script() -> str:
    """WRK_LUA with the natural-key scenarios' paths and SOAP envelope filled in."""
    head, tail = soap_body("KEY").decode().split("KEY")
    return (
        WRK_LUA.replace("JSON_KEY_PATH", JSON_KEY_PATH)
        .replace("XML_KEY_PATH", XML_KEY_PATH)
        .replace("SOAP_HEAD", _lua_string(head))
        .replace("SOAP_TAIL", _lua_string(tail))
    )


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str  # direct | miss | replay | storm | miss-mem | miss-<client> | miss-json | ...
    target: str  # backend | proxy | proxy-mem | proxy-<client> | proxy-w2
    mode: str  # the key pattern: unique | replay | storm | json-key | xml-key
    connections: int

    @property
    def label(self) -> str:
        return f"{self.name} c{self.connections}"

    @property
    def allowed_statuses(self) -> frozenset[int]:
        # The storm's duplicates that arrive while the first request runs get 409 by contract.
        if self.name == "storm":
            return frozenset({201, 409})
        return frozenset({self.success})

    @property
    def success(self) -> int:
        """The status of one execution: the SOAP endpoint answers 200, the others 201."""
        return 200 if self.mode == "xml-key" else 201

    @property
    def unique(self) -> bool:
        """Every request on a new key: as many executions as answers."""
        return self.mode in ("unique", "json-key", "xml-key")


@dataclass(slots=True)
class Sample:
    """One round of one scenario."""

    round: int
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    statuses: dict[int, int]
    errors: dict[str, int]
    executions: int | None = None  # charges the backend's ledger recorded in the round
    problems: list[str] = field(default_factory=list)
    # CPU seconds each role's processes used over the round: proxy (the scenario's target
    # when it is a proxy), backend, redis; per request, divided by `requests`.
    cpu_s: dict[str, float] = field(default_factory=dict)

    def cpu_us(self, role: str) -> float | None:
        if role not in self.cpu_s or not self.requests:
            return None
        return self.cpu_s[role] / self.requests * 1e6


def scenarios(
    transports: bool, keys: bool = True, workers: bool = False, candidate: bool = False
) -> list[Scenario]:
    out: list[Scenario] = []
    for connections in CONNECTIONS:
        out += [
            Scenario("direct", "backend", "unique", connections),
            Scenario("miss", "proxy", "unique", connections),
            Scenario("replay", "proxy", "replay", connections),
            Scenario("storm", "proxy", "storm", connections),
            Scenario("miss-mem", "proxy-mem", "unique", connections),
        ]
    if transports:
        for client in OTHER_CLIENTS:
            out.append(Scenario(f"miss-{client}", f"proxy-{client}", "unique", 32))
    if keys:
        out.append(Scenario("miss-json", "proxy", "json-key", 32))
        out.append(Scenario("miss-xml", "proxy", "xml-key", 32))
    if workers:
        out.append(Scenario("miss-w2", "proxy-w2", "unique", 32))
    if candidate:
        # The same scenarios through a proxy run from another checkout (--candidate).
        for connections in CONNECTIONS:
            out.append(Scenario("miss-cand", "proxy-cand", "unique", connections))
        out.append(Scenario("replay-cand", "proxy-cand", "replay", 32))
    return out


def check(scenario: Scenario, sample: Sample) -> list[str]:
    """Why this round does not count (empty: it does)."""
    problems: list[str] = []
    if sample.requests == 0:
        problems.append("no responses at all")
    for status, count in sorted(sample.statuses.items()):
        if status not in scenario.allowed_statuses:
            problems.append(f"{count} responses with status {status}")
    for kind, count in sorted(sample.errors.items()):
        if count:
            problems.append(f"{count} socket {kind} errors")
    ok = sample.statuses.get(scenario.success, 0)
    executions = sample.executions
    if executions is not None:
        if scenario.unique:
            # Requests still in flight when the load stopped may have charged unanswered.
            if not ok <= executions <= ok + scenario.connections:
                problems.append(f"{executions} backend executions for {ok} answers of 201")
        elif scenario.mode == "replay" and executions != 0:
            problems.append(f"{executions} backend executions while replaying (want 0)")
        elif scenario.mode == "storm" and executions != 1:
            problems.append(f"{executions} backend executions for one key (want 1)")
    return problems


# --------------------------------------------------------------------------- processes


class Child(ManagedProcess):
    """One server of the run: devstack starts, watches and stops it (its own process group,
    optionally pinned to `cpus`); the bench gives its argv and its readiness probe."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        workdir: Path,
        cpus: set[int] | None,
        port: int,
        probe: Callable[[], bool],
        tree: Path = REPO,
    ) -> None:
        super().__init__(workdir, f"{name}.log", cpus=cpus)
        self.name = name
        self.tree = tree  # the checkout whose code this child runs
        self.argv = argv
        self.port = port
        self.probe = probe

    def command(self) -> list[str]:
        return self.argv

    def environment(self) -> dict[str, str]:
        env = child_env()
        env["PYTHONPATH"] = str(self.tree) + os.pathsep + env["PYTHONPATH"]
        return env

    def alive(self) -> bool:
        return self.running

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive("starting")
            with contextlib.suppress(OSError, http.client.HTTPException):
                if self.probe():
                    return
            time.sleep(0.05)
        raise StackError(f"{self.name} not ready within {READY_TIMEOUT:.0f}s:\n{self.log_tail()}")


def _http(
    method: str,
    port: int,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _redis_ping(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1) as sock:
        sock.sendall(b"PING\r\n")
        return sock.recv(64).startswith(b"+PONG")


def launch_redis(workdir: Path, cpus: set[int] | None) -> Child:
    port = free_port()
    argv = redis_command(port, workdir)
    return Child("redis", argv, workdir, cpus, port, lambda: _redis_ping(port)).launch()


def launch_backend(workdir: Path, cpus: set[int] | None, kind: str = "trivial") -> Child:
    """`trivial`: scripts/bench_backend.py, a Starlette handler that answers 201 (the proxy's
    own cost shows); `sample`: the sample backend, a SQLite insert per charge."""
    port = free_port()
    if kind == "trivial":
        argv = [sys.executable, str(REPO / "scripts" / "bench_backend.py")]
        argv += ["--host", HOST, "--port", str(port)]
    else:
        argv = [sys.executable, "-m", "sample_backend", "--host", HOST, "--port", str(port)]
        argv += ["--db", ":memory:", "--log-level", "warning"]

    def ready() -> bool:
        return _http("GET", port, "/healthz")[0] == 200

    return Child("backend", argv, workdir, cpus, port, ready).launch()


def launch_proxy(
    name: str,
    client: str | None,
    backend_port: int,
    redis_port: int,
    workdir: Path,
    cpus: set[int] | None,
    workers: int = 1,
    tree: Path = REPO,
    store: str | None = None,
) -> Child:
    """The proxy in `workers` workers, with the upstream `client` (None: the tree's default);
    the backend need not be up yet (the upstream pool is lazy)."""
    port, admin_port = free_port(), free_port()
    config: dict[str, Any] = {
        "upstream": f"http://{HOST}:{backend_port}",
        "listen": {"host": HOST, "port": port},
        "admin": {"host": HOST, "port": admin_port},
        "routes": [
            {
                "name": "charges",
                "methods": ["POST"],
                "path": PATH,
                "key": {"from": "header", "name": "Idempotency-Key"},
                "required": True,
            },
            {
                "name": "pay",
                "methods": ["POST"],
                "path": JSON_KEY_PATH,
                "key": {"from": "json", "field": "order_id"},
                "required": True,
            },
            {
                "name": "soap-pay",
                "methods": ["POST"],
                "path": XML_KEY_PATH,
                "key": {
                    "from": "xml",
                    "path": "/soap:Envelope/soap:Body/p:Pay/p:OrderId",
                    "namespaces": {"soap": SOAP11_NS, "p": PAYMENTS_NS},
                },
                "required": True,
            },
        ],
    }
    if client is not None:
        config["upstream_pool"] = {"client": client}
    if workers > 1:
        config["workers"] = workers
    config_path = workdir / f"{name}.yaml"
    config_path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    argv = [sys.executable, "-m", "proxy", "run", "--log-level", "warning"]
    store_url = store or f"redis://{HOST}:{redis_port}/0"
    argv += ["--redis-url", store_url, "--config", str(config_path)]

    def ready() -> bool:
        # The admin port can answer before the traffic port is bound: wait for both.
        if _http("GET", admin_port, "/readyz")[0] != 200:
            return False
        socket.create_connection((HOST, port), timeout=1).close()
        return True

    # With several workers the supervisor's /readyz waits for every one of them.
    child = Child(name, argv, workdir, cpus, port, ready, tree)
    return child.launch()


def read_rss_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(value.split()[0])
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's supervisor and its workers), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(parents.get(current, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                # Fields after the command name (which may hold spaces): state is [0],
                # utime and stime are the 14th and 15th fields of the whole line.
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


# --------------------------------------------------------------------------- load


@dataclass(frozen=True, slots=True)
class Load:
    """How one round is driven: the load generator and its settings."""

    generator: str  # wrk | aiohttp
    wrk: str | None
    lua: Path | None
    threads: int
    cpus: set[int] | None


def run_round(
    load: Load, port: int, scenario: Scenario, prefix: str, duration: int, round_no: int
) -> Sample:
    nkeys = REPLAY_KEYS if scenario.mode == "replay" else 1
    if load.generator == "wrk":
        raw = _run_wrk(load, port, scenario, prefix, nkeys, duration)
    else:
        raw = asyncio.run(
            _aiohttp_load(port, scenario.mode, prefix, nkeys, scenario.connections, duration)
        )
    seconds = raw["duration_us"] / 1e6
    requests = int(raw["requests"])
    return Sample(
        round=round_no,
        requests=requests,
        seconds=round(seconds, 3),
        rps=requests / seconds if seconds > 0 else 0.0,
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        statuses={int(k): int(v) for k, v in raw["statuses"].items()},
        errors={k: int(v) for k, v in raw["errors"].items()},
    )


def _run_wrk(
    load: Load, port: int, scenario: Scenario, prefix: str, nkeys: int, duration: int
) -> dict[str, Any]:
    assert load.wrk is not None and load.lua is not None
    threads = max(1, min(load.threads, scenario.connections))
    argv = [
        load.wrk, "-t", str(threads), "-c", str(scenario.connections), "-d", f"{duration}s",
        "--timeout", f"{CLIENT_TIMEOUT_S}s", "-s", str(load.lua), f"http://{HOST}:{port}{PATH}",
        "--", scenario.mode, prefix, str(nkeys),
    ]  # fmt: skip
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=duration + CLIENT_TIMEOUT_S + 30,
        preexec_fn=die_with_parent(load.cpus),
        check=False,
    )
    for line in done.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
            return result
    raise RuntimeError(
        f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}"
    )


async def _aiohttp_load(
    port: int, mode: str, prefix: str, nkeys: int, connections: int, duration: float
) -> dict[str, Any]:
    """The stand-in for wrk: `connections` workers, each one request at a time, until the end."""
    import aiohttp

    base = f"http://{HOST}:{port}"
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    errors = {"connect": 0, "read": 0, "write": 0, "timeout": 0}
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False
    ) as session:
        started = time.perf_counter()
        deadline = started + duration

        async def worker(worker_id: int) -> None:
            for counter in range(1, MAX_REQUESTS_PER_WORKER + 1):
                if time.perf_counter() >= deadline:
                    return
                if mode == "replay":
                    key = f"{prefix}-{counter % nkeys}"
                elif mode == "storm":
                    key = prefix
                else:
                    key = f"{prefix}-{worker_id}-{counter}"
                path, body, headers = request_for(mode, key)
                sent = time.perf_counter()
                try:
                    async with session.post(base + path, data=body, headers=headers) as response:
                        await response.read()
                        status = response.status
                except TimeoutError:
                    errors["timeout"] += 1
                    continue
                except aiohttp.ClientConnectorError:
                    errors["connect"] += 1
                    continue
                except aiohttp.ClientError:
                    errors["read"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                statuses[str(status)] = statuses.get(str(status), 0) + 1

        await asyncio.gather(*(worker(i + 1) for i in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_us": elapsed * 1e6,
        "p50_us": _percentile(latencies, 50) * 1e6,
        "p99_us": _percentile(latencies, 99) * 1e6,
        "errors": errors,
        "statuses": statuses,
    }


def _percentile(ordered: Sequence[float], pct: float) -> float:
    if not ordered:
        return 0.0
    index = min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered)) - 1))
    return ordered[index]


# --------------------------------------------------------------------------- the run


@dataclass(slots=True)
class Servers:
    backend: int
    ports: dict[str, int]  # target -> port
    proxy: Child
    replay_prefix: str  # the keys the replay rounds repeat, COMPLETED before any round
    pids: dict[str, list[int]] = field(default_factory=dict)  # child name -> its processes

    def roles(self, target: str) -> dict[str, list[int]]:
        """Whose CPU a round of a scenario on `target` reads: the proxy it drives (if any),
        the backend and Redis."""
        out = {"proxy": self.pids[target]} if target != "backend" else {}
        out["backend"] = self.pids["backend"]
        out["redis"] = self.pids["redis"]
        return out


def ledger_reset(backend_port: int) -> None:
    status, _ = _http("POST", backend_port, "/v1/ledger/reset")
    if status != 204:
        raise RuntimeError(f"ledger reset answered {status}")


def ledger_charges(backend_port: int) -> int:
    status, body = _http("GET", backend_port, "/v1/ledger")
    if status != 200:
        raise RuntimeError(f"ledger answered {status}")
    return int(json.loads(body)["charges"])


def ledger_settled(backend_port: int) -> int:
    """The charge count once it stops moving.

    When the load stops, the proxy still finishes the forwards it has started (a client
    hanging up never cancels the owner's work), so charges can land a little later.
    """
    charges = ledger_charges(backend_port)
    for _ in range(50):
        time.sleep(0.1)
        now = ledger_charges(backend_port)
        if now == charges:
            return now
        charges = now
    return charges


def complete_replay_keys(port: int, prefix: str) -> None:
    """Execute each replay key once, so the replay rounds only ever see COMPLETED records."""
    for i in range(REPLAY_KEYS):
        headers = {"Content-Type": "application/json", "Idempotency-Key": f"{prefix}-{i}"}
        status, body = _http("POST", port, PATH, BODY, headers)
        if status != 201:
            raise RuntimeError(f"completing replay key {i}: {status} {body[:200]!r}")


def measure(
    servers: Servers,
    load: Load,
    plan: list[Scenario],
    *,
    rounds: int,
    duration: int,
    replay_prefix: str,
    nonce: str,
    log: Callable[[str], None],
) -> dict[Scenario, list[Sample]]:
    """Every scenario once per round, the starting point rotated each round."""
    results: dict[Scenario, list[Sample]] = {s: [] for s in plan}
    for round_no in range(1, rounds + 1):
        shift = (round_no - 1) % len(plan)
        for scenario in plan[shift:] + plan[:shift]:
            if scenario.mode == "replay":
                prefix = replay_prefix
            else:
                prefix = f"{scenario.name}-{nonce}-r{round_no}-c{scenario.connections}"
            ledger_settled(servers.backend)  # the previous round's stragglers, if any
            ledger_reset(servers.backend)
            roles = servers.roles(scenario.target)
            before = {role: cpu_seconds(pids) for role, pids in roles.items()}
            sample = run_round(
                load, servers.ports[scenario.target], scenario, prefix, duration, round_no
            )
            # After the stragglers settled: their completions are part of the rounds' cost.
            sample.executions = ledger_settled(servers.backend)
            sample.cpu_s = {role: cpu_seconds(pids) - before[role] for role, pids in roles.items()}
            sample.problems = check(scenario, sample)
            results[scenario].append(sample)
            flag = "  INVALID: " + "; ".join(sample.problems) if sample.problems else ""
            proxy_cpu = sample.cpu_us("proxy")
            cpu = f"  proxy {proxy_cpu:5.0f} us/req" if proxy_cpu is not None else ""
            log(
                f"round {round_no} {scenario.label:<15} {sample.rps:9.0f} req/s  "
                f"p50 {sample.p50_ms:7.2f} ms  p99 {sample.p99_ms:7.2f} ms{cpu}{flag}"
            )
    return results


def warm_up(servers: Servers, load: Load, duration: int, nonce: str) -> None:
    """Fill connection pools, caches and lazily imported code before anything counts."""
    for target in servers.ports:
        warm = Scenario("warmup", target, "unique", 32)
        run_round(load, servers.ports[target], warm, f"warm-{nonce}-{target}", duration, 0)


def profile(
    servers: Servers, load: Load, outdir: Path, seconds: int, log: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """py-spy on the proxy under miss-path and replay-path load at 32 connections."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(py_spy).exists():
        log("no profile: --profile needs py-spy (the bench extra: pip install -e '.[bench]')")
        return {}
    outdir.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[dict[str, Any]]] = {}
    for name, mode, prefix in (
        ("miss", "unique", f"profile-{uuid.uuid4().hex[:8]}"),
        ("replay", "replay", servers.replay_prefix),
    ):
        raw = outdir / f"{name}.txt"
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(servers.proxy.pid), "--duration", str(seconds),
             "--rate", "250", "--format", "raw", "--output", str(raw), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(0.5)
        scenario = Scenario(f"profile-{name}", "proxy", mode, 32)
        run_round(load, servers.ports["proxy"], scenario, prefix, seconds + 1, 0)
        _, err = spy.communicate(timeout=seconds + 30)
        if spy.returncode != 0 or not raw.exists():
            # Typically ptrace is not allowed here: the benchmark stands without a profile.
            log(f"no profile: py-spy failed: {err.decode(errors='replace')[-500:]}")
            return {}
        text = raw.read_text()
        tables[name] = bench_report.hottest(text, limit=10)
        tables[f"{name} (by package)"] = bench_report.by_package(text)
        tables[f"{name} (by part of the path)"] = bench_report.breakdown(text)
        log(f"profile {name}: {raw}")
    return tables


# --------------------------------------------------------------------------- summary


def summarize(results: dict[Scenario, list[Sample]]) -> list[dict[str, Any]]:
    out = []
    for scenario, samples in results.items():
        statuses: dict[int, int] = {}
        errors: dict[str, int] = {}
        for sample in samples:
            for status, count in sample.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
            for kind, count in sample.errors.items():
                errors[kind] = errors.get(kind, 0) + count
        out.append(
            {
                "name": scenario.name,
                "target": scenario.target,
                "connections": scenario.connections,
                "label": scenario.label,
                "rps": statistics.median(s.rps for s in samples),
                "p50_ms": statistics.median(s.p50_ms for s in samples),
                "p99_ms": statistics.median(s.p99_ms for s in samples),
                "statuses": {str(k): v for k, v in sorted(statuses.items())},
                "non_2xx": sum(v for k, v in statuses.items() if not 200 <= k < 300),
                "errors": errors,
                "executions": sum(s.executions or 0 for s in samples),
                # Median over the rounds of each role's CPU per answered request.
                "cpu_us": {
                    role: statistics.median(v for s in samples if (v := s.cpu_us(role)) is not None)
                    for role in ("proxy", "backend", "redis")
                    if any(s.cpu_us(role) is not None for s in samples)
                },
                "problems": [f"round {s.round}: {p}" for s in samples for p in s.problems],
                "rounds": [asdict(s) for s in samples],
            }
        )
    return out


def _find(rows: list[dict[str, Any]], name: str, connections: int) -> dict[str, Any] | None:
    for row in rows:
        if row["name"] == name and row["connections"] == connections:
            return row
    return None


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def comparisons(rows: list[dict[str, Any]], rss: dict[str, int]) -> dict[str, Any]:
    """Ratios to direct, added latency, memory, transports; with targets where there are any."""
    ratios = []
    for name in ("miss", "replay", "storm"):
        for connections in CONNECTIONS:
            row, base = _find(rows, name, connections), _find(rows, "direct", connections)
            if row is None or base is None or not base["rps"]:
                continue
            paired = [
                p["rps"] / d["rps"]
                for p, d in zip(row["rounds"], base["rounds"], strict=False)
                if d["rps"]
            ]
            target = None  # the targets are CPU per request now; the ratios inform
            value = row["rps"] / base["rps"]
            ratios.append(
                {
                    "name": f"{name}/direct",
                    "connections": connections,
                    "value": value,
                    "rounds_min": min(paired, default=value),
                    "rounds_max": max(paired, default=value),
                    "target": target,
                    "verdict": _verdict(value >= target) if target is not None else None,
                }
            )
    added = []
    for name in ("miss", "replay", "miss-mem"):
        row, base = _find(rows, name, 1), _find(rows, "direct", 1)
        if row is None or base is None:
            continue
        value = row["p50_ms"] - base["p50_ms"]
        target = TARGETS["added_p50_ms"] if name == "miss" else None
        added.append(
            {
                "name": name,
                "value_ms": value,
                "target": target,
                "verdict": _verdict(value <= target) if target is not None else None,
            }
        )
    rss_mb = rss.get("VmRSS", 0) / 1024
    memory = {
        "rss_mb": rss_mb,
        "peak_mb": rss.get("VmHWM", 0) / 1024,
        "target": TARGETS["rss_mb"],
        "verdict": _verdict(rss_mb <= TARGETS["rss_mb"]),
    }
    transports = None
    base = _find(rows, "direct", 32)
    by_client = {DEFAULT_CLIENT: _find(rows, "miss", 32)}
    by_client.update({client: _find(rows, f"miss-{client}", 32) for client in OTHER_CLIENTS})
    if base is not None and all(found is not None for found in by_client.values()):
        transports = {
            client: {
                **{k: found[k] for k in ("rps", "p50_ms", "p99_ms")},
                "cpu_us": found["cpu_us"].get("proxy"),
                "vs_direct": found["rps"] / base["rps"] if base["rps"] else 0.0,
            }
            for client, found in by_client.items()
            if found is not None
        }
    keys = None
    header, json_row, xml_row = (
        _find(rows, "miss", 32),
        _find(rows, "miss-json", 32),
        _find(rows, "miss-xml", 32),
    )
    if json_row is not None and xml_row is not None and json_row["rps"]:
        keys = {
            "cpu_us": key_cpu_us(),
            "json": {k: json_row[k] for k in ("rps", "p50_ms", "p99_ms")},
            "xml": {k: xml_row[k] for k in ("rps", "p50_ms", "p99_ms")},
            "xml_vs_json": xml_row["rps"] / json_row["rps"],
            "json_vs_header": json_row["rps"] / header["rps"] if header and header["rps"] else None,
            # What the XML route adds per request over the JSON route, from the throughputs.
            "xml_extra_us": (1 / xml_row["rps"] - 1 / json_row["rps"]) * 1e6
            if xml_row["rps"]
            else None,
        }
    cpu = []
    for name in ("miss", "replay"):
        row = _find(rows, name, 32)
        value = row["cpu_us"].get("proxy") if row else None
        if row is None or value is None:
            continue
        target = TARGETS[f"{name}_cpu_us"]
        cpu.append(
            {
                "name": name,
                "connections": 32,
                "value_us": value,
                "per_round": [
                    r["cpu_s"]["proxy"] / r["requests"] * 1e6
                    for r in row["rounds"]
                    if r["requests"]
                ],
                "target": target,
                "verdict": _verdict(value <= target),
            }
        )
    workers = None
    one, two = _find(rows, "miss", 32), _find(rows, "miss-w2", 32)
    if one is not None and two is not None and one["rps"]:
        workers = {
            "one": {k: one[k] for k in ("rps", "p50_ms", "p99_ms", "cpu_us")},
            "two": {k: two[k] for k in ("rps", "p50_ms", "p99_ms", "cpu_us")},
            "two_vs_one": two["rps"] / one["rps"],
        }
    candidate = []
    for name, connections in (("miss", 1), ("miss", 32), ("replay", 32)):
        base, cand = _find(rows, name, connections), _find(rows, f"{name}-cand", connections)
        if base is None or cand is None:
            continue
        before, after = base["cpu_us"].get("proxy"), cand["cpu_us"].get("proxy")

        def proxy_us(sample: dict[str, Any]) -> float | None:
            spent = sample["cpu_s"].get("proxy")
            return spent / sample["requests"] * 1e6 if spent and sample["requests"] else None

        # Paired by round (the two ran close together in time), which cancels much of the
        # machine's drift between rounds.
        paired = [
            b - a
            for x, y in zip(base["rounds"], cand["rounds"], strict=False)
            if (a := proxy_us(x)) is not None and (b := proxy_us(y)) is not None
        ]
        candidate.append(
            {
                "name": name,
                "connections": connections,
                "cpu_us": [before, after],
                "paired_delta_us": statistics.median(paired) if paired else None,
                "paired_range_us": [min(paired), max(paired)] if paired else None,
                "p50_ms": [base["p50_ms"], cand["p50_ms"]],
                "rps": [base["rps"], cand["rps"]],
            }
        )
    return {
        "ratios": ratios,
        "added_p50": added,
        "cpu": cpu,
        "candidate": candidate,
        "memory": memory,
        "transports": transports,
        "keys": keys,
        "workers": workers,
    }


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        found = re.search(r"v=(\S+)", out)
        redis_version = found.group(1) if found else out.strip()
    wrk_version = None
    if shutil.which("wrk"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["wrk", "--version"], capture_output=True, text=True, timeout=10, check=False
            )
            first = (done.stdout or done.stderr or "wrk").splitlines()[0]
            wrk_version = first.split(" Copyright")[0].strip()
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": redis_version,
        "wrk": wrk_version,
        "versions": _package_versions(),
    }


def _package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("uvicorn", "uvloop", "httptools", "aiohttp", "httpx", "redis", "starlette"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def print_summary(run: dict[str, Any], emit: Callable[[str], None]) -> None:
    emit("")
    emit(
        f"{'scenario':<12}{'conns':>6}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'proxy us':>10}{'backend us':>11}{'redis us':>9}  statuses"
    )

    def us(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    for row in run["rows"]:
        statuses = " ".join(f"{k}:{v}" for k, v in row["statuses"].items())
        cpu = row["cpu_us"]
        emit(
            f"{row['name']:<12}{row['connections']:>6}{row['rps']:>10.0f}"
            f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{us(cpu.get('proxy')):>10}"
            f"{us(cpu.get('backend')):>11}{us(cpu.get('redis')):>9}  {statuses}"
        )
    emit("(CPU per answered request, in us: utime + stime of each role's processes)")
    emit("")
    for ratio in run["comparisons"]["ratios"]:
        line = (
            f"ratio {ratio['name']:<14} c={ratio['connections']:<3} {ratio['value']:.2f}x"
            f"  (rounds {ratio['rounds_min']:.2f}-{ratio['rounds_max']:.2f})"
        )
        if ratio["target"] is not None:
            line += f"  target >= {ratio['target']:.2f}x  {ratio['verdict']}"
        emit(line)
    for added in run["comparisons"]["added_p50"]:
        line = f"added p50 at c=1 ({added['name']} - direct)  {added['value_ms']:+.2f} ms"
        if added["target"] is not None:
            line += f"  target <= {added['target']:.1f} ms  {added['verdict']}"
        emit(line)
    for cpu in run["comparisons"]["cpu"]:
        emit(
            f"proxy CPU per request, {cpu['name']} c={cpu['connections']}  "
            f"{cpu['value_us']:.0f} us  target <= {cpu['target']:.0f} us  {cpu['verdict']}"
        )
    memory = run["comparisons"]["memory"]
    emit(
        f"proxy RSS after the run  {memory['rss_mb']:.1f} MB (peak {memory['peak_mb']:.1f} MB)"
        f"  target <= {memory['target']:.0f} MB  {memory['verdict']}"
    )
    transports = run["comparisons"]["transports"]
    if transports:
        emit(
            "upstream clients, miss c=32  "
            + ", ".join(
                f"{client} {t['rps']:.0f} req/s ({t['vs_direct']:.2f}x direct, proxy "
                f"{us(t['cpu_us'])} us/req)"
                for client, t in transports.items()
            )
        )
    for cand in run["comparisons"].get("candidate") or []:
        (cpu0, cpu1), (p0, p1), (r0, r1) = cand["cpu_us"], cand["p50_ms"], cand["rps"]
        paired = cand["paired_delta_us"]
        spread = cand["paired_range_us"]
        emit(
            f"candidate {cand['name']} c={cand['connections']}  proxy CPU/req "
            f"{cpu0:.0f} -> {cpu1:.0f} us (paired by round {paired:+.0f}, "
            f"{spread[0]:+.0f}..{spread[1]:+.0f}), p50 {p0:.2f} -> {p1:.2f} ms, "
            f"{r0:.0f} -> {r1:.0f} req/s"
        )
    workers = run["comparisons"].get("workers")
    if workers:
        emit(
            f"workers miss c=32  one {workers['one']['rps']:.0f} req/s, two "
            f"{workers['two']['rps']:.0f} req/s: {workers['two_vs_one']:.2f}x"
        )
    keys = run["comparisons"].get("keys")
    if keys:
        extra = keys["xml_extra_us"]
        emit(
            f"key routes miss c=32  json {keys['json']['rps']:.0f} req/s "
            f"(p50 {keys['json']['p50_ms']:.2f} ms), xml {keys['xml']['rps']:.0f} req/s "
            f"(p50 {keys['xml']['p50_ms']:.2f} ms): xml/json {keys['xml_vs_json']:.2f}x"
            + (f", {extra:+.0f} us per request" if extra is not None else "")
        )
        cpu = keys["cpu_us"]
        emit(
            f"key + fingerprint CPU per request (in process)  json {cpu['json']:.0f} us, "
            f"xml {cpu['xml']:.0f} us"
        )
    non_2xx = sum(row["non_2xx"] for row in run["rows"] if row["name"] != "storm")
    storm_409 = sum(row["statuses"].get("409", 0) for row in run["rows"] if row["name"] == "storm")
    emit(f"non-2xx answers outside the storm: {non_2xx}; 409s in the storm (expected): {storm_409}")
    problems = [f"{row['label']}: {p}" for row in run["rows"] for p in row["problems"]]
    if problems:
        emit("INVALID: " + "; ".join(problems))
    else:
        emit(
            "valid: only 201s (200s on the SOAP route, 409s in the storm); "
            "ledger executions as each path implies"
        )
    for name, table in (run.get("profile") or {}).items():
        if "part of the path" in name:
            emit(f"\n{name.split(' (')[0]} path by part (share of active samples):")
        else:
            what = "packages" if "package" in name else "functions"
            emit(f"\nhottest {what}, {name} path (self samples, share of active samples):")
        for entry in table:
            emit(f"  {entry['share'] * 100:5.1f}%  {entry['function']}")


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench.py",
        description="Benchmark the proxy against the backend it fronts, in one run.",
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per round (default 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per scenario (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per server")
    parser.add_argument("--write", metavar="MD", help="write the report (and a PNG next to it)")
    parser.add_argument(
        "--quick", action="store_true", help="1 s rounds, 1 round, no transports, no write"
    )
    parser.add_argument(
        "--transports",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the httpx upstream client on the miss path at 32 connections",
    )
    parser.add_argument(
        "--keys",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure routes keyed by a JSON field and by an XML element (miss, 32 conns)",
    )
    parser.add_argument(
        "--two-workers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run a proxy with --workers 2 (miss path, 32 connections)",
    )
    parser.add_argument(
        "--candidate",
        metavar="DIR",
        help="also run the miss (1 and 32 connections) and replay (32) scenarios through a "
        "proxy started from another checkout, interleaved with this one's: a change's gain",
    )
    parser.add_argument(
        "--backend",
        choices=("trivial", "sample"),
        default="trivial",
        help="trivial: a Starlette handler that answers 201, so the proxy's own cost shows "
        "(default); sample: the sample backend with its SQLite ledger",
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "aiohttp"),
        default="auto",
        help="wrk when installed (auto), else the asyncio stand-in",
    )
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help="run only these scenarios (comma-separated names, e.g. miss-json,miss-xml)",
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="pin the proxy to CPU 1 and the backend, Redis and wrk to CPU 0",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="after measuring, py-spy the proxy on the miss and replay paths (raw stacks in DIR)",
    )
    parser.add_argument("--profile-seconds", type=int, default=9)
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.rounds, args.warmup = 1, 1, 1
        args.transports, args.two_workers, args.write = False, False, None
    if args.duration < 1 or args.rounds < 1:
        parser.error("--duration and --rounds must be at least 1")
    return args


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)

    def log(line: str) -> None:
        print(line, flush=True)

    wrk = shutil.which("wrk")
    generator = "wrk" if args.loadgen == "wrk" or (args.loadgen == "auto" and wrk) else "aiohttp"
    if generator == "wrk" and wrk is None:
        log("wrk is not installed")
        return 2
    if generator == "aiohttp":
        log("load generator: the asyncio (aiohttp) stand-in; numbers are lower than with wrk")
    nproc = len(os.sched_getaffinity(0))
    pinned = args.pin and nproc >= 2
    proxy_cpus, other_cpus = ({1}, {0}) if pinned else (None, None)
    candidate = Path(args.candidate).resolve() if args.candidate else None
    if candidate is not None and not (candidate / "proxy" / "__init__.py").exists():
        log(f"--candidate {args.candidate}: no proxy/ package there")
        return 2
    plan = scenarios(args.transports, args.keys, args.two_workers, candidate is not None)
    if args.only:
        wanted = {name.strip() for name in args.only.split(",") if name.strip()}
        plan = [scenario for scenario in plan if scenario.name in wanted]
        if not plan:
            log(f"--only {args.only}: no such scenario")
            return 2
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    nonce = uuid.uuid4().hex[:8]
    log(
        f"{nproc} CPUs, load average {load_before[0]:.2f}; {generator}; {len(plan)} scenarios "
        f"x {args.rounds} round(s) x {args.duration} s, interleaved; "
        + ("pinned" if pinned else "not pinned")
    )
    children: list[Child] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            workdir = Path(tmp)
            lua = workdir / "bench.lua"
            lua.write_text(wrk_script())
            load = Load(generator, wrk, lua, args.threads, other_cpus)
            redis_child = launch_redis(workdir, other_cpus)
            children.append(redis_child)
            redis_child.ready()
            # The rest start side by side: the proxies need Redis at start-up, not the backend.
            backend_child = launch_backend(workdir, other_cpus, args.backend)
            children.append(backend_child)
            proxy_child = launch_proxy(
                "proxy", None, backend_child.port, redis_child.port, workdir, proxy_cpus
            )
            children.append(proxy_child)
            if any(scenario.target == "proxy-mem" for scenario in plan):
                children.append(
                    launch_proxy(
                        "proxy-mem",
                        None,
                        backend_child.port,
                        redis_child.port,
                        workdir,
                        proxy_cpus,
                        store="memory://",
                    )
                )
            others: dict[str, Child] = {}
            if args.transports:
                for client in OTHER_CLIENTS:
                    others[client] = launch_proxy(
                        f"proxy-{client}", client, backend_child.port, redis_child.port,
                        workdir, proxy_cpus,
                    )  # fmt: skip
                    children.append(others[client])
            if any(scenario.target == "proxy-w2" for scenario in plan):
                children.append(
                    launch_proxy(
                        "proxy-w2",
                        None,
                        backend_child.port,
                        redis_child.port,
                        workdir,
                        proxy_cpus,
                        workers=2,
                    )
                )
            if candidate is not None:
                children.append(
                    launch_proxy(
                        "proxy-cand",
                        None,
                        backend_child.port,
                        redis_child.port,
                        workdir,
                        proxy_cpus,
                        tree=candidate,
                    )
                )
            for child in children:
                child.ready()
            ports = {child.name: child.port for child in children[1:]}  # target -> port
            replay_prefix = f"replay-{nonce}"
            servers = Servers(backend_child.port, ports, proxy_child, replay_prefix)
            servers.pids = {child.name: process_tree(child.pid) for child in children}
            log(
                "servers up: "
                + ", ".join(f"{child.name} :{child.port}" for child in children)
                + (" (pinned: proxy on CPU 1, the rest on CPU 0)" if pinned else " (not pinned)")
            )
            proxy_port = proxy_child.port
            complete_replay_keys(proxy_port, replay_prefix)
            warm_up(servers, load, args.warmup, nonce)
            results = measure(
                servers,
                load,
                plan,
                rounds=args.rounds,
                duration=args.duration,
                replay_prefix=replay_prefix,
                nonce=nonce,
                log=log,
            )
            rss = read_rss_kib(proxy_child.pid)
            rss_others = {client: read_rss_kib(child.pid) for client, child in others.items()}
            store = None
            if not args.quick:
                log("store: round trip and CPU per EVALSHA (redis-py client vs lean pool)")
                store = measure_store(redis_child.port)
            profile_tables = None
            if args.profile:
                profile_tables = profile(
                    servers, load, Path(args.profile), args.profile_seconds, log
                )
            for child in children:
                if not child.alive():
                    raise RuntimeError(f"{child.name} died during the run:\n{child.log_tail()}")
    finally:
        stop_all(children[::-1])  # all at once: each drains for a moment
    rows = summarize(results)
    run: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": _command(argv),
        "machine": machine(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "settings": {
            "duration": args.duration,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "generator": generator,
            "wrk_threads": args.threads,
            "pinned": pinned,
            "transports": args.transports,
            "keys": args.keys,
            "two_workers": args.two_workers,
            "backend": args.backend,
            "replay_keys": REPLAY_KEYS,
        },
        "rows": rows,
        "comparisons": comparisons(rows, rss),
        "rss_clients_mb": {client: rss["VmRSS"] / 1024 for client, rss in rss_others.items()},
        "profile": profile_tables,
        "store": store,
        "targets": TARGETS,
    }
    print_summary(run, log)
    valid = not any(row["problems"] for row in run["rows"])
    if args.write:
        if not valid:
            log(f"not writing {args.write}: the run is invalid")
        else:
            md_path = Path(args.write)
            png_path = md_path.with_suffix(".png")
            bench_report.write_chart(run, png_path)
            md_path.write_text(bench_report.markdown(run, png_path.name))
            log(f"wrote {md_path} and {png_path}")
    return 0 if valid else 1


def _command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    python = (
        os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else "python"
    )
    script = os.path.relpath(Path(__file__).resolve(), REPO)
    return shlex.join([python, script, *args])


if __name__ == "__main__":
    sys.exit(main())
