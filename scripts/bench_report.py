"""The benchmark's outputs: docs/benchmarks.md, its chart, and py-spy profile tables.

Kept apart from scripts/bench.py so the measuring code stays readable; everything
here works on the plain `run` dict that bench.py builds.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SCENARIO_ORDER = (
    "direct",
    "miss",
    "replay",
    "storm",
    "miss-mem",
    "miss-aiohttp",
    "miss-httpx",
    "miss-json",
    "miss-xml",
    "miss-w2",
    "miss-cand",
    "replay-cand",
)
COLOURS = {
    "direct": "#4c72b0",
    "miss": "#dd8452",
    "replay": "#55a868",
    "storm": "#c44e52",
    "miss-mem": "#ffb482",
    "miss-aiohttp": "#a1c9f4",
    "miss-httpx": "#8172b3",
    "miss-json": "#937860",
    "miss-xml": "#da8bc3",
    "miss-w2": "#8c8c8c",
    "miss-cand": "#ccb974",
    "replay-cand": "#64b5cd",
}
DESCRIPTIONS = {
    "direct": "the backend itself, no proxy: the baseline every ratio divides by",
    "miss": "through the proxy, a new `Idempotency-Key` per request: claim (one Lua call), "
    "mark SENT, forward, store the response",
    "replay": "through the proxy, 16 keys that were COMPLETED before the first round: every "
    "request is a replay (from the proxy's in-process cache of COMPLETED records)",
    "storm": "through the proxy, every request of the round on one fresh key: the first "
    "executes, the ones arriving while it runs get 409, everything after replays",
    "miss-mem": "the miss path through a proxy on the in-process memory store (no store "
    "round trip): the difference to `miss` is what Redis adds",
    "miss-aiohttp": "the miss path through a second proxy whose upstream client is aiohttp",
    "miss-httpx": "the miss path through a third proxy whose upstream client is httpx",
    "miss-json": "the miss path on `POST /v1/orders/pay`, keyed by the JSON body's `order_id` "
    "(a new order per request, no header)",
    "miss-xml": "the miss path on `POST /soap/payments`, a SOAP 1.1 envelope keyed by its "
    "`p:OrderId` element (hardened parse, C14N 2.0 fingerprint); the backend answers 200",
    "miss-w2": "the miss path through a third proxy started with `--workers 2` (uvicorn's "
    "supervisor, one shared socket; its CPU is the sum over the supervisor and both workers)",
    "miss-cand": "the miss path through a proxy run from another checkout (`--candidate DIR`)",
    "replay-cand": "the replay path through the `--candidate` proxy (same keys, same Redis)",
}

_LINE = re.compile(r":\d+\)$")


# --------------------------------------------------------------------------- profiles


def _frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` -> `func (file-ish path)`, without the line number."""
    frame = _LINE.sub(")", frame.strip())
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        head, sep, tail = frame.partition(marker)
        if sep:
            name = head.split(" (", 1)[0]
            tail = tail.split("/", 1)[1] if marker == "/lib/python3" and "/" in tail else tail
            return f"{name} ({tail}"
    return frame


# Where a frame's file lives -> the package its self time is charged to.
PACKAGES = (
    ("proxy/", "proxy (this project)"),
    ("redis/", "redis-py"),
    ("aiohttp/", "aiohttp (upstream client)"),
    ("multidict/", "aiohttp (upstream client)"),
    ("yarl/", "aiohttp (upstream client)"),
    ("httpx/", "httpx (upstream client)"),
    ("httpcore/", "httpx (upstream client)"),
    ("uvicorn/", "uvicorn (HTTP server)"),
    ("prometheus_client/", "prometheus_client"),
    ("asyncio/runners.py", "event loop (uvloop C code)"),
    ("asyncio/", "asyncio (stdlib)"),
)
# Samples whose innermost Python frame is Runner.run are in uvloop's own C code.
LOOP_FRAME = "Runner.run (asyncio/runners.py)"


def _samples(raw: str) -> Iterator[tuple[list[str], int]]:
    for line in raw.splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [_frame_name(f) for f in stack.split(";") if f.strip()]
        if frames:
            yield frames, int(number)


def _package(frame: str) -> str:
    return next((name for marker, name in PACKAGES if marker in frame), "other")


def by_package(raw: str) -> list[dict[str, Any]]:
    """Self samples per package: the innermost frame outside asyncio's stdlib decides, so a
    socket write that redis-py makes through asyncio streams counts for redis-py."""
    counts: dict[str, int] = {}
    total = 0
    for frames, n in _samples(raw):
        total += n
        package = "asyncio (stdlib)"
        for frame in reversed(frames):
            found = _package(frame)
            if found != "asyncio (stdlib)":
                package = found
                break
        counts[package] = counts.get(package, 0) + n
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return [
        {"function": name, "samples": n, "share": n / total if total else 0.0} for name, n in ranked
    ]


# The parts of a request's path, for the breakdown: the innermost frame that matches a
# rule decides (stdlib frames without a rule of their own, such as asyncio's streams, are
# charged to their caller). First match in this order within one frame.
PARTS = (
    ("proxy/store/", "store round trips (packing, socket, parsing, pool)"),
    ("redis/", "store round trips (packing, socket, parsing, pool)"),
    ("proxy/upstream.py", "upstream client (request, pool, parsing the answer)"),
    ("proxy/http1.py", "upstream client (request, pool, parsing the answer)"),
    ("aiohttp/", "upstream client (request, pool, parsing the answer)"),
    ("multidict/", "upstream client (request, pool, parsing the answer)"),
    ("yarl/", "upstream client (request, pool, parsing the answer)"),
    ("uvicorn/", "server (uvicorn, httptools, ASGI send/receive)"),
    ("proxy/app.py", "server (uvicorn, httptools, ASGI send/receive)"),
    ("asyncio/timeouts.py", "timers, tasks, shielding"),
    ("asyncio/tasks.py", "timers, tasks, shielding"),
    ("asyncio/locks.py", "timers, tasks, shielding"),
    ("asyncio/events.py", "timers, tasks, shielding"),
    ("prometheus_client/", "metrics"),
    ("proxy/metrics.py", "metrics"),
    ("proxy/fingerprint.py", "fingerprint and key"),
    ("proxy/keys.py", "fingerprint and key"),
    ("proxy/request.py", "fingerprint and key"),
    ("logging/", "logging"),
    ("proxy/logs.py", "logging"),
    ("proxy/", "lifecycle and replies (the rest of proxy/)"),
    ("asyncio/runners.py", "event loop (uvloop C code: I/O, callbacks)"),
)


def breakdown(raw: str) -> list[dict[str, Any]]:
    """Samples per part of the request's path (store, upstream client, server, timers and
    tasks, metrics, fingerprint, logging, ...), as shares of the active samples."""
    counts: dict[str, int] = {}
    total = 0
    for frames, n in _samples(raw):
        total += n
        part = "other"
        for frame in reversed(frames):
            found = next((name for marker, name in PARTS if marker in frame), None)
            if found is not None:
                part = found
                break
        counts[part] = counts.get(part, 0) + n
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return [
        {"function": name, "samples": n, "share": n / total if total else 0.0} for name, n in ranked
    ]


def hottest(raw: str, *, limit: int = 10, inclusive: bool = False) -> list[dict[str, Any]]:
    """Top functions of py-spy's raw (collapsed) output by share of samples.

    Self (default): the innermost Python frame of each sample, so C code (uvloop,
    hiredis, the socket calls) is charged to the Python function that called it.
    Inclusive: every function on the stack, counted once per sample.
    """
    counts: dict[str, int] = {}
    total = 0
    for frames, n in _samples(raw):
        total += n
        names = set(frames) if inclusive else {frames[-1]}
        for name in names:
            if name == LOOP_FRAME and not inclusive:
                name = "(event loop: uvloop C code, no Python frame)"
            counts[name] = counts.get(name, 0) + n
    ranked = sorted(counts.items(), key=lambda item: -item[1])[:limit]
    return [
        {"function": name, "samples": n, "share": n / total if total else 0.0} for name, n in ranked
    ]


# --------------------------------------------------------------------------- chart


def write_chart(run: dict[str, Any], path: Path) -> None:
    """Grouped bars: req/s per scenario, one group per connection count, ratio labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = run["rows"]
    groups = sorted({row["connections"] for row in rows})
    names = [n for n in SCENARIO_ORDER if any(row["name"] == n for row in rows)]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    for i, name in enumerate(names):
        for g, connections in enumerate(groups):
            row = next(
                (r for r in rows if r["name"] == name and r["connections"] == connections), None
            )
            if row is None:
                continue
            base = next(
                (r for r in rows if r["name"] == "direct" and r["connections"] == connections),
                None,
            )
            x = g + (i - (len(names) - 1) / 2) * width
            ax.bar(
                x,
                row["rps"],
                width * 0.92,
                color=COLOURS.get(name, "#999999"),
                label=name if g == len(groups) - 1 or connections == 1 else None,
            )
            if name == "direct" or base is None or not base["rps"]:
                label = f"{row['rps']:.0f}"
            else:
                label = f"{row['rps'] / base['rps']:.2f}x"
            ax.annotate(
                label,
                (x, row["rps"]),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=8,
            )
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=False))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper left")
    ax.set_xticks(range(len(groups)), [f"{c} connection{'s' if c > 1 else ''}" for c in groups])
    ax.set_ylabel("requests/s (median of rounds)")
    settings = run["settings"]
    ax.set_title(
        f"POST /v1/charges, one worker each; {settings['rounds']} interleaved rounds of "
        f"{settings['duration']} s; labels: proxy/direct",
        fontsize=10,
    )
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- markdown


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} µs"


def _fmt_statuses(statuses: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in statuses.items()) or "-"


def _miss_path_limits(run: dict[str, Any]) -> list[str]:
    """Why the miss path costs what it costs, from the store numbers of the same run."""
    store = run.get("store")
    if not store:
        return []
    added = {a["name"]: a["value_ms"] for a in run["comparisons"]["added_p50"]}
    rtt = store["ping_rtt_ms_p50"]
    client, lean = store["redis_py_client"], store["lean_pool"]
    lines = [
        "## What limits the miss path",
        "",
        "A new key costs three store transitions (claim, mark SENT, complete: docs/design.md "
        "says why SENT is its own step) around one extra HTTP hop. Two of them are on the "
        "client's path: the answer goes out once the completion is written, without waiting "
        "for Redis to confirm it (docs/design.md, \"The completion is not on the client's "
        'path"). Measured against the same Redis in the same run:',
        "",
        "| what | measured |",
        "|---|---|",
        f"| loopback round trip to Redis (PING, p50, one connection) | {rtt:.3f} ms |",
        f"| two transitions at that floor | {2 * rtt:.2f} ms |",
        f"| CPU per EVALSHA through redis-py's client (32 concurrent) | "
        f"{client['cpu_us_per_op']:.0f} us ({client['ops_per_s']:.0f} ops/s) |",
        f"| CPU per EVALSHA through the proxy's pool (proxy/store/pool.py) | "
        f"{lean['cpu_us_per_op']:.0f} us ({lean['ops_per_s']:.0f} ops/s) |",
        "",
    ]
    if "miss" in added:
        text = f"At one connection the proxy adds {added['miss']:+.2f} ms at p50 on Redis"
        if "miss-mem" in added:
            text += (
                f", and {added['miss-mem']:+.2f} ms on the in-process memory store, where the "
                "story is the same without a store round trip: the proxy's own path (uvicorn, "
                "the key, the fingerprint, the upstream client, the reply) costs the larger "
                f"part, the two round trips about {added['miss'] - added['miss-mem']:.2f} ms"
            )
        lines.append(
            text + ". At one connection every step runs on a cold CPU (the proxy sleeps "
            "between events), so its CPU per request is higher than at 32 connections and "
            "adds to latency rather than competing for throughput."
        )
        lines.append("")
    lines.append(
        "The single-node store talks to Redis through a small pool of redis-py connections "
        "rather than redis-py's client: the client's retry wrapper, blocking pool and "
        "per-write timeout task cost more CPU than the round trip itself (the two CPU rows "
        "above). Cluster and Sentinel keep the client, which knows their topology."
    )
    lines.append("")
    return lines


# What each change made for the miss path's cost gained, as measured when it was made
# (`--candidate`: a proxy from the commit before the change, interleaved with one from
# the change, on the same backend and Redis; "paired" is the median of the per-round
# differences). The two proxies of a --candidate run do not sit at the same spot on a
# shared machine: the replay path, which a change may not touch, differed by up to 40 µs
# between them. So a change is measured both ways round where it matters, and a gain
# below that is given as measured, not as proven.
CHANGES: tuple[tuple[str, str, str], ...] = (
    (
        "Built-in HTTP/1.1 client for protected routes (`proxy/http1.py`)",
        "the `upstream_pool.client` table below, this run: CPU per request and req/s of "
        "the same path through the built-in client and through aiohttp",
        "the largest single cut: aiohttp's request/response objects were about 30 % of the "
        "miss path's CPU in the profile (py-spy, 590 -> 460 µs of sampled time per "
        "request when it landed)",
    ),
    (
        "Redis commands packed by the pool (`proxy/store/pool.py`)",
        "timeit of one claim with its WAIT; --candidate",
        "14.0 -> 5.8 µs per claim (about 25 µs per new key over three transitions); "
        "--candidate: 60 µs paired at 32 connections, of which up to 40 may be the "
        "two proxies' position (the replay path, untouched, differed by 38)",
    ),
    (
        "The answer does not wait for the completion (docs/design.md)",
        "--candidate, miss path, 1 connection",
        "p50 1.36 -> 1.12 ms (one store round trip off the client's path); CPU per "
        "request unchanged within the noise (the write still happens, as its own task)",
    ),
    (
        "The writes of one loop turn leave in one send (`proxy/protocol.py`)",
        "--candidate both ways round, replay path, 32 connections",
        "16 µs less CPU per replay paired by round (40 µs by the medians); the miss "
        "path's change was within the noise",
    ),
    (
        "Built-in client: one wake-up per answer, framing noted while reading, the loop "
        "looked up once; the request's log line written with the answer",
        "py-spy (a genexpr at 2.3 % of the miss path's samples, one coroutine wake-up "
        "per answer that uvicorn writes in two pieces)",
        "each below the noise of one run; kept because each removes work",
    ),
)


def _yardstick(run: dict[str, Any]) -> list[str]:
    """The targets are in µs, and µs move with the machine: the trivial backend's own CPU
    per request on the direct path says how fast this run's machine was."""
    rows = {(r["name"], r["connections"]): r.get("cpu_us", {}) for r in run["rows"]}
    backend = rows.get(("direct", 32), {}).get("backend")
    if not backend:
        return []
    parts = []
    for name in ("miss", "replay"):
        proxy = rows.get((name, 32), {}).get("proxy")
        if proxy:
            unit = " backend requests" if not parts else ""
            parts.append(f"{proxy / backend:.1f}{unit} on the {name} path")
    return [
        "How fast the machine was: the trivial backend alone cost "
        f"{backend:.0f} µs of CPU per request at 32 connections in this run, and the same "
        "machine has given twice that in other runs, with every µs above moving alike. "
        "Measured in that yardstick, which compares across runs better than µs do, the "
        f"proxy's CPU per request was {' and '.join(parts)}.",
        "",
    ]


def _changes() -> list[str]:
    lines = [
        "## Changes and what each gained",
        "",
        "| change | measured with | gain |",
        "|---|---|---|",
    ]
    lines += [f"| {change} | {how} | {gain} |" for change, how, gain in CHANGES]
    lines.append("")
    return lines


def markdown(run: dict[str, Any], chart_name: str) -> str:
    m = run["machine"]
    s = run["settings"]
    c = run["comparisons"]
    out: list[str] = []
    add = out.append
    add("# Benchmarks")
    add("")
    add(
        "Generated by `scripts/bench.py` (`make bench`) on "
        f"{run['started']} (UTC). The numbers below come from one run on one machine; "
        "rerun it on yours before relying on them. "
        + (
            "This run was made on a shared, busy machine (see [Noise](#noise)): treat the "
            "absolute numbers as rough and the ratios as the result."
            # Judged before the run: the benchmark's own load shows in the "after" numbers.
            if run["load_average"]["before"][0] > 0.5 * m["nproc"]
            else ""
        )
    )
    add("")
    add(
        "Tracing is off here (no `OTEL_*` environment); what it costs when on is in "
        "[benchmarks-tracing.md](benchmarks-tracing.md) (`scripts/bench_tracing.py`)."
    )
    add("")
    add("## Targets")
    add("")
    add("| what | target | result | |")
    add("|---|---|---|---|")
    for cpu in c.get("cpu", []):
        rounds = ", ".join(f"{v:.0f}" for v in cpu["per_round"])
        add(
            f"| {cpu['name']}-path CPU of the proxy per request, {cpu['connections']} "
            f"connections | <= {cpu['target']:.0f} µs | {cpu['value_us']:.0f} µs "
            f"(rounds {rounds}) | {cpu['verdict']} |"
        )
    for added in c["added_p50"]:
        if added["target"] is None:
            continue
        add(
            f"| added p50 latency, 1 connection, {added['name']} path (proxy p50 - direct p50) "
            f"| <= {added['target']:.1f} ms | {added['value_ms']:+.2f} ms | {added['verdict']} |"
        )
    mem = c["memory"]
    add(
        f"| proxy RSS after the run (VmRSS) | <= {mem['target']:.0f} MB | {mem['rss_mb']:.1f} MB "
        f"(peak {mem['peak_mb']:.1f} MB) | {mem['verdict']} |"
    )
    add("")
    add(
        "CPU per request is the utime + stime of the proxy's own process (read from "
        "`/proc/PID/stat` before and after each round, after the round's last forwards "
        "finished) divided by the answers of the round: what one core spends per request, "
        "whatever else runs on the machine. It is judged at 32 connections, where the "
        "event loop batches as it does under real load; throughput ratios are for "
        "information (they depend on what else shares the CPUs)."
    )
    add("")
    out.extend(_yardstick(run))
    storm_409 = sum(r["statuses"].get("409", 0) for r in run["rows"] if r["name"] == "storm")
    errors = sum(sum(r["errors"].values()) for r in run["rows"])
    add(
        f"Validity: every answer was 201 except {storm_409} 409s in the storm (expected: "
        f"duplicates of a request still in flight), {errors} socket errors, and the backend's "
        "ledger showed the executions each path implies (below)."
    )
    add("")
    out.extend(_miss_path_limits(run))
    out.extend(_changes())
    add(f"## Results (medians of {s['rounds']} interleaved rounds of {s['duration']} s)")
    add("")
    add(
        "| scenario | connections | req/s | vs direct | p50 ms | p99 ms | proxy CPU/req "
        "| backend CPU/req | Redis CPU/req | answers | executions (all rounds) |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    direct = {r["connections"]: r for r in run["rows"] if r["name"] == "direct"}
    rows = sorted(
        run["rows"],
        key=lambda r: (r["connections"], SCENARIO_ORDER.index(r["name"])),
    )
    for row in rows:
        base = direct.get(row["connections"])
        vs = (
            f"{row['rps'] / base['rps']:.2f}x"
            if base and base["rps"] and row["name"] != "direct"
            else "1.00x"
            if row["name"] == "direct"
            else "-"
        )
        cpu = row.get("cpu_us", {})
        add(
            f"| {row['name']} | {row['connections']} | {row['rps']:.0f} | {vs} "
            f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {_us(cpu.get('proxy'))} "
            f"| {_us(cpu.get('backend'))} | {_us(cpu.get('redis'))} "
            f"| {_fmt_statuses(row['statuses'])} | {row['executions']} |"
        )
    add("")
    add(
        "*answers*: HTTP statuses summed over the rounds; *executions*: charges the "
        "backend's ledger recorded during those rounds (reset before each round). A round "
        "counts only with nothing but 201 (and 409 in the storm), no socket errors, and "
        "executions matching the path: one per 201 directly and on the miss path (plus at "
        "most one per connection still in flight when the load stopped), none while "
        "replaying, exactly one per storm round."
    )
    add("")
    for ratio in c["ratios"]:
        verdict = (
            f" (target >= {ratio['target']:.2f}x: {ratio['verdict']})"
            if ratio["target"] is not None
            else ""
        )
        add(
            f"- {ratio['name']} at {ratio['connections']} connection"
            f"{'s' if ratio['connections'] > 1 else ''}: **{ratio['value']:.2f}x**, per-round "
            f"{ratio['rounds_min']:.2f}-{ratio['rounds_max']:.2f}{verdict}"
        )
    for added in c["added_p50"]:
        add(f"- added p50 at 1 connection, {added['name']} path: **{added['value_ms']:+.2f} ms**")
    add(
        f"- proxy RSS after the run: **{mem['rss_mb']:.1f} MB** (VmHWM peak "
        f"{mem['peak_mb']:.1f} MB)"
        + "".join(
            f"; the {client}-client proxy: {mb:.1f} MB"
            for client, mb in (run.get("rss_clients_mb") or {}).items()
        )
    )
    add("")
    add(f"![req/s per scenario and connection count]({chart_name})")
    add("")
    t = c.get("transports")
    if t:
        add("## Upstream client (miss path, 32 connections)")
        add("")
        add("| upstream_pool.client | req/s | vs direct | p50 ms | p99 ms | proxy CPU/req |")
        add("|---|---:|---:|---:|---:|---:|")
        for name, row in t.items():
            cpu = f"{row['cpu_us']:.0f} µs" if row.get("cpu_us") is not None else "-"
            add(
                f"| {name} | {row['rps']:.0f} | {row['vs_direct']:.2f}x "
                f"| {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {cpu} |"
            )
        add("")
        add(
            "The three proxies ran in the same run, against the same backend and Redis, in "
            "interleaved rounds. The built-in client (`proxy/http1.py`: httptools' parser, a "
            "keep-alive pool, one write per request) is the default because it costs the "
            "least CPU per request here; aiohttp and httpx stay selectable "
            "(`upstream_pool.client`), and pass-through traffic, which streams both ways, "
            "always goes through aiohttp."
        )
        add("")
    if c.get("candidate"):
        add("## Candidate change (`--candidate`), interleaved with this checkout")
        add("")
        add("| path | connections | proxy CPU/req | paired by round | p50 ms | req/s |")
        add("|---|---:|---:|---:|---:|---:|")
        for cand in c["candidate"]:
            (cpu0, cpu1), (p0, p1), (r0, r1) = cand["cpu_us"], cand["p50_ms"], cand["rps"]
            paired = cand["paired_delta_us"]
            add(
                f"| {cand['name']} | {cand['connections']} | {_us(cpu0)} -> {_us(cpu1)} "
                f"| {'-' if paired is None else f'{paired:+.0f} µs'} "
                f"| {p0:.2f} -> {p1:.2f} | {r0:.0f} -> {r1:.0f} |"
            )
        add("")
    w = c.get("workers")
    if w:
        add("## One worker or two (miss path, 32 connections)")
        add("")
        add("| proxy | req/s | p50 ms | p99 ms | proxy CPU/req |")
        add("|---|---:|---:|---:|---:|")
        for name, label in (("one", "1 worker"), ("two", "`--workers 2`")):
            add(
                f"| {label} | {w[name]['rps']:.0f} | {w[name]['p50_ms']:.2f} "
                f"| {w[name]['p99_ms']:.2f} | {_us(w[name]['cpu_us'].get('proxy'))} |"
            )
        add("")
        add(
            f"Two workers carried {w['two_vs_one']:.2f}x one worker's miss-path throughput. "
            f"On this {m['nproc']}-CPU machine the load generator, the backend and Redis "
            "share the same CPUs, so a second worker can only take what they leave; on a "
            "host with cores to spare the gain is closer to the CPU per request's ratio. "
            "With several workers the supervisor serves the admin port for all of them (see "
            "docs/configuration.md)."
        )
        add("")
    k = c.get("keys")
    if k:
        add("## Key routes: a JSON field or an XML element (miss path, 32 connections)")
        add("")
        add("| route keyed by | req/s | p50 ms | p99 ms | key + fingerprint CPU |")
        add("|---|---:|---:|---:|---:|")
        for name, label in (("json", "JSON field `order_id`"), ("xml", "SOAP `p:OrderId`")):
            add(
                f"| {label} | {k[name]['rps']:.0f} | {k[name]['p50_ms']:.2f} "
                f"| {k[name]['p99_ms']:.2f} | {k['cpu_us'][name]:.0f} µs |"
            )
        add("")
        add(
            f"The XML route carried {k['xml_vs_json']:.2f}x the JSON route's throughput. The "
            "load numbers include the sample backend's own parsing of each body; the last "
            "column is the proxy's share alone (reading the key and computing the canonical "
            "fingerprint of one request, measured in process): the hardened XML parse and "
            "C14N 2.0 cost that much more than JSON per request."
        )
        add("")
    add("## Scenarios")
    add("")
    add(
        "Every request is `POST /v1/charges` with `Content-Type: application/json`, the "
        'body `{"amount":100,"currency":"EUR"}` and an `Idempotency-Key` header; the '
        "proxy has one header-keyed route on that path (the key-route scenarios use their "
        "own routes, described below)."
    )
    add("")
    for name in SCENARIO_ORDER:
        if any(r["name"] == name for r in run["rows"]):
            add(f"- **{name}**: {DESCRIPTIONS[name]}")
    add("")
    add(
        "Keys on the direct and miss paths are unique per request (wrk thread id + a "
        "counter, under a per-round prefix); the backend ignores the header, so the direct "
        "path carries exactly the same requests."
    )
    add("")
    add("## Set-up")
    add("")
    add(
        '- Redis: a private `redis-server --save "" --appendonly no` (no persistence, '
        "so no disk in the measurement)."
    )
    if s.get("backend", "sample") == "trivial":
        add(
            "- Backend: `scripts/bench_backend.py`, one uvicorn worker (uvloop, httptools, "
            "no access log), a Starlette handler that reads the body and answers 201 with a "
            "small JSON body (the SOAP route: 200), counting charges in memory: the trivial "
            "backend, so that the proxy's own cost shows."
        )
    else:
        add(
            "- Backend: `python -m sample_backend --db :memory:`, one uvicorn worker, a "
            "SQLite insert per charge."
        )
    add(
        "- Proxy: `python -m proxy run --log-level warning --redis-url ... --config ...`, "
        "one worker (uvloop, httptools), the route above, defaults otherwise."
    )
    generator = (
        f"wrk ({m['wrk']})" if s["generator"] == "wrk" else "the asyncio (aiohttp) stand-in for wrk"
    )
    add(
        f"- Load: {generator}"
        f", {s['wrk_threads']} thread(s), a Lua script for the keys and a `done()` that "
        "prints the latency percentiles as JSON; 1 and 32 connections."
    )
    add(
        "- CPU: "
        + (
            "pinned: the proxy on CPU 1; backend, Redis and wrk on CPU 0."
            if s["pinned"]
            else "not pinned: the kernel schedules wrk, the backend, Redis and the proxy "
            f"over all {m['nproc']} CPUs."
        )
    )
    add(
        f"- {s['warmup']} s of warm-up load against each server before the first round; "
        f"{s['replay_keys']} replay keys completed before the first round."
    )
    add("")
    add("## Machine")
    add("")
    add(f"- CPUs (nproc): {m['nproc']}, {m['cpu_model']}")
    add(f"- Linux {m['kernel']}")
    add(f"- Python {m['python']}, Redis {m['redis']}")
    add("- " + ", ".join(f"{name} {version}" for name, version in sorted(m["versions"].items())))
    before = run["load_average"]["before"]
    after = run["load_average"]["after"]
    add(
        f"- load average (1/5/15 min) before the run: {before[0]:.2f} / {before[1]:.2f} / "
        f"{before[2]:.2f}; after: {after[0]:.2f} / {after[1]:.2f} / {after[2]:.2f}"
    )
    add("")
    add("## Command")
    add("")
    add("```")
    add(run["command"])
    add("```")
    add("")
    add(
        "`make bench` runs `.venv/bin/python scripts/bench.py --write docs/benchmarks.md "
        "--profile out/profile`. `--quick` (1 s rounds, one round, no transports, no second "
        "worker, no write) is the smoke test's version; `--profile DIR` adds py-spy profiles "
        "of the proxy on the miss and replay paths, raw stacks in DIR (py-spy comes with the "
        "`bench` extra; where the machine forbids attaching to a process, the run goes on "
        "without a profile); `--backend sample` puts the sample backend (SQLite) behind the "
        "proxy instead of the trivial one; `--candidate DIR` runs the miss and replay paths "
        "through a second proxy started from another checkout, interleaved with this one, "
        "and reports the CPU per request of both, paired by round: a change's gain."
    )
    add("")
    add("## Noise")
    add("")
    add(
        f"- Everything runs on the same {m['nproc']} CPUs: wrk, the backend, Redis and the "
        "proxy compete for them, so the proxy's ratios include the CPU the extra process "
        "takes from the backend. That is the realistic case for a sidecar, and the "
        "pessimistic one for a proxy on its own host."
    )
    add(
        "- Each scenario runs once per round and the order rotates between rounds, so a "
        "burst of outside load lands on different scenarios in different rounds; the "
        "tables show medians, and the per-round ratio range shows the spread."
    )
    add(
        "- The machine may be shared (the load averages above say how busy it was). A "
        "quiet machine gives higher absolute numbers; the ratios move less."
    )
    add(
        "- At 1 connection, throughput is the inverse of latency, so it magnifies "
        "scheduling noise; p99 is the noisiest number in the tables."
    )
    if not s["pinned"]:
        add(
            "- Unpinned, CPU per request depends on where the kernel places the proxy "
            "against wrk, the backend and Redis, and on 2 CPUs that comes in two modes: "
            "replay rounds of one configuration were seen at 82-95 µs and at 131-157 µs "
            "(with 12 000 and 7 000 req/s), the miss path's at 415-680 µs. A round's "
            "number moves with the mode it landed in; the median of three takes whichever "
            "mode two rounds had. `--pin` (the proxy on CPU 1, the rest on CPU 0) removes "
            "the modes: replay 67-83 µs, miss 419-509 µs in three rounds, but it also "
            "puts wrk and the backend on one CPU, which makes the direct path faster and "
            "every ratio and added latency worse for the proxy."
        )
    add("")
    if run.get("profile"):
        add("## Profile (py-spy)")
        add("")
        add(
            "The proxy under 32 connections for a few seconds per path, sampled by py-spy; "
            "self samples (the innermost Python frame; C code counts for its Python caller) "
            "as a share of the samples in which the process was busy. *By part of the path* "
            "charges each sample to the innermost frame that belongs to a part (a socket "
            "write through asyncio's streams counts for whoever called it), so the parts add "
            "up to the whole; multiplied by the CPU per request above, a share is that "
            "part's µs per request."
        )
        add("")
        for name, table in run["profile"].items():
            add(f"**{name}**")
            add("")
            add("| share | function |")
            add("|---:|---|")
            for entry in table:
                add(f"| {entry['share'] * 100:.1f}% | `{entry['function']}` |")
            add("")
    add("## Per-round numbers")
    add("")
    add(
        "| scenario | connections | round | req/s | p50 ms | p99 ms | proxy CPU/req "
        "| answers | executions |"
    )
    add("|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        for sample in row["rounds"]:
            statuses = {str(k): v for k, v in sample["statuses"].items()}
            proxy_s = sample.get("cpu_s", {}).get("proxy")
            proxy_us = (
                proxy_s / sample["requests"] * 1e6 if proxy_s and sample["requests"] else None
            )
            add(
                f"| {row['name']} | {row['connections']} | {sample['round']} "
                f"| {sample['rps']:.0f} | {sample['p50_ms']:.2f} | {sample['p99_ms']:.2f} "
                f"| {_us(proxy_us)} | {_fmt_statuses(statuses)} | {sample['executions']} |"
            )
    add("")
    return "\n".join(out)
