"""The command line: `idempotency-proxy run | demo | check-config | check-store | records`.

Exit codes: 0 fine, 1 unsafe or refused, 2 a configuration error or an unreachable store,
3 an unexpected error (one line on stderr, never a traceback).

Longer than the other modules because it is the operator's whole command surface: every
subcommand's flags next to its handler, so a flag and what it does are read together.
Handlers import what they need lazily: `run` never loads the records tooling."""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import orjson

from proxy import __version__
from proxy.config import ENV_PREFIX, ConfigError, Settings, load_settings, masked
from proxy.errorformat import PRESETS

if TYPE_CHECKING:  # the store's client libraries load only for the commands that use them
    from proxy.records import Record
    from proxy.store.redis import RedisStore

PROG = "idempotency-proxy"

_DEFAULTS = Settings()


def _flag_help(text: str, env: str, default: object) -> str:
    return f"{text} (env {ENV_PREFIX}{env}; default: {default})"


def _add_store_flags(
    parser: argparse.ArgumentParser, default: str = "the in-process memory store"
) -> None:
    parser.add_argument(
        "--redis-url",
        metavar="URL",
        help=_flag_help(
            "the shared store: redis://, rediss://, redis+sentinel://h:p/master, "
            "redis+cluster://h:p, or memory:// for one process",
            "REDIS_URL",
            default,
        ),
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=_flag_help("YAML config file (docs/configuration.md)", "CONFIG", "none"),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "A reverse proxy that makes any HTTP backend idempotent: each request's key is "
            "claimed in a shared store, the backend executes it at most once, and every "
            "duplicate, on any replica, gets the first response."
        ),
        epilog="Flags beat environment variables, which beat the config file.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser(
        "run",
        help="serve traffic in front of an upstream",
        description="Serve traffic in front of an upstream HTTP backend.",
        epilog="Flags beat environment variables, which beat the config file.",
    )
    run.add_argument(
        "--upstream",
        metavar="URL",
        help=_flag_help(
            "the backend's base URL, e.g. http://127.0.0.1:9000", "UPSTREAM", "none; required"
        ),
    )
    run.add_argument(
        "--host", help=_flag_help("traffic listen address", "HOST", _DEFAULTS.listen.host)
    )
    run.add_argument(
        "--port", type=int, help=_flag_help("traffic port", "PORT", _DEFAULTS.listen.port)
    )
    run.add_argument(
        "--admin-port",
        type=int,
        metavar="P",
        help=_flag_help(
            "admin port for /livez /readyz /metrics", "ADMIN_PORT", _DEFAULTS.admin.port
        ),
    )
    _add_store_flags(run)
    run.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help=_flag_help(
            "worker processes on one port (more than 1 needs Redis; one admin port for all)",
            "WORKERS",
            1,
        ),
    )
    run.add_argument(
        "--mode",
        choices=["enforce", "observe"],
        type=str.lower,
        help=_flag_help(
            "enforce, or observe: forward everything and count what enforcement would have "
            "blocked or replayed (routes may override it)",
            "MODE",
            "enforce",
        ),
    )
    run.add_argument(
        "--log-level",
        metavar="L",
        choices=["debug", "info", "warning", "error", "critical"],
        type=str.lower,
        help=_flag_help("debug, info, warning, error or critical", "LOG_LEVEL", "info"),
    )

    demo = commands.add_parser(
        "demo",
        help="play the double-charge stories against the sample backend, direct and proxied",
        description=(
            "Start a private Redis, the sample payment backend and five proxy replicas, play "
            "the double click, timeout-and-retry and burst stories straight against the backend "
            "and then through the replicas, and print what the ledger shows."
        ),
    )
    demo.add_argument("--orders", type=int, default=200, help="orders in the burst (default: 200)")
    demo.add_argument("--replicas", type=int, default=5, help="proxy replicas (default: 5)")
    demo.add_argument(
        "--memory",
        action="store_true",
        help="use the in-process memory store even if redis-server is installed "
        "(default: a private redis-server when one is on PATH)",
    )
    demo.add_argument(
        "--error-format",
        default="problem",
        choices=sorted(PRESETS),
        help="the replicas' format for their own answers (default: problem)",
    )

    check_config = commands.add_parser(
        "check-config",
        help="validate the configuration and print the effective settings (secrets masked)",
        description=(
            "Read the config file, the environment and the flags as `run` would, validate "
            "them and print the effective settings as YAML with every secret masked; start "
            "nothing and connect to nothing. Exits 0 when valid, 2 with one line naming the "
            "key when not."
        ),
    )
    _add_store_flags(check_config)
    check_config.add_argument(
        "--upstream", metavar="URL", help=_flag_help("as for run", "UPSTREAM", "none")
    )
    check_config.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print nothing when the config is valid (default: print the settings)",
    )

    check = commands.add_parser(
        "check-store",
        help="are the store's settings safe for idempotency records?",
        description=(
            "Connect as the proxy would (TLS, credentials), read maxmemory-policy, persistence "
            "and replication, and run every command the proxy uses on a probe key to prove "
            "the ACL allows them. Exits 1 when something is unsafe or denied, 2 when the store "
            "cannot be reached or the config is wrong."
        ),
    )
    _add_store_flags(check, "store.url from --config, else memory://, which has nothing to check")

    records = commands.add_parser(
        "records",
        help="inspect or resolve one record (operators, for UNKNOWN outcomes)",
        description=(
            "Find a record by tenant, route and key (or by the key_hash of a log line), "
            "show it, resolve an UNKNOWN record to a response after checking the payment "
            "system's ledger, or release it so the client's retry executes. Records in "
            "other states need --force."
        ),
    )
    actions = records.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("show", "print the record as JSON"),
        ("resolve", "UNKNOWN -> COMPLETED with the given response"),
        ("release", "delete the record so a retry executes (UNKNOWN only without --force)"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        _add_store_flags(action, "store.url from --config; the memory store is refused")
        which = action.add_mutually_exclusive_group(required=True)
        which.add_argument(
            "--key",
            action="append",
            help="the idempotency key as the client sent it; for a composite key, once per "
            "part, in the route's order (required: --key or --hash)",
        )
        which.add_argument(
            "--hash",
            metavar="KEY_HASH",
            help=(
                "the key_hash from a log line instead of the key (needs the proxy's "
                f"key_hash_secret: env {ENV_PREFIX}KEY_HASH_SECRET or the config file); "
                "it names the record, so --route and --tenant are not needed (required: "
                "--key or --hash)"
            ),
        )
        action.add_argument(
            "--route",
            default="default",
            help="route name as in the config file (default: 'default', the no-routes rule)",
        )
        action.add_argument(
            "--tenant",
            default=None,
            help="tenant, as the trusted header gave it (default: none, the scope of requests "
            "sent without the tenant header, or the only one when no tenant header is set)",
        )
        if name != "show":
            action.add_argument(
                "--force",
                action="store_true",
                help="also act on records that are not UNKNOWN (default: UNKNOWN only)",
            )
        if name == "resolve":
            action.add_argument(
                "--status", type=int, required=True, help="HTTP status to replay (required)"
            )
            action.add_argument(
                "--body", default="", help="response body to replay, as text (default: empty)"
            )
            action.add_argument(
                "--content-type",
                default="application/json",
                help="Content-Type of the replayed response (default: application/json)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        _dispatch(args)
    except ConfigError as exc:
        print(f"{PROG}: config error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        # An operator gets one line that says what failed, never a traceback.
        print(f"{PROG}: {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(3)


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        _run(args)
    elif args.command == "check-config":
        sys.exit(_check_config(args))
    elif args.command == "demo":
        try:
            from devstack.demo import main as demo_main
        except ModuleNotFoundError as exc:
            if exc.name not in ("devstack", "devstack.demo"):
                raise
            print(
                f"{PROG}: demo: the development stack (devstack/) is not installed; "
                "run it from a checkout: make demo",
                file=sys.stderr,
            )
            sys.exit(2)
        sys.exit(
            demo_main(
                orders=args.orders,
                replicas=args.replicas,
                memory=args.memory,
                error_format=args.error_format,
            )
        )
    elif args.command == "check-store":
        sys.exit(asyncio.run(_check_store(args)))
    elif args.command == "records":
        sys.exit(asyncio.run(_records(args)))


def _check_config(args: argparse.Namespace) -> int:
    import yaml

    from proxy.routes import RouteTable

    settings = load_settings(args.config, {"redis_url": args.redis_url, "upstream": args.upstream})
    # Route templates are checked as `run` checks them; the upstream is needed to `run`.
    RouteTable(settings.model_copy(update={"upstream": settings.upstream or "http://unused"}))
    if not args.quiet:
        print(yaml.safe_dump(masked(settings), sort_keys=False), end="")
    if not settings.upstream:
        print(
            f"{PROG}: note: no upstream set; `run` needs --upstream or 'upstream:'",
            file=sys.stderr,
        )
    return 0


def _run(args: argparse.Namespace) -> None:
    from proxy import logs

    settings = load_settings(
        args.config,
        {
            "upstream": args.upstream,
            "host": args.host,
            "port": args.port,
            "admin_port": args.admin_port,
            "redis_url": args.redis_url,
            "workers": args.workers,
            "log_level": args.log_level,
            "mode": args.mode,
        },
    )
    if not settings.upstream:
        raise ConfigError(
            "upstream: required (--upstream URL, IDEMPOTENCY_PROXY_UPSTREAM or 'upstream:')"
        )
    from proxy.routes import RouteTable

    RouteTable(settings)  # path templates are checked before anything starts
    from proxy import tracing

    tracing.check_environment()
    logs.configure(settings.log_level)
    from proxy.server import run

    run(settings)


def _store_settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config, {"redis_url": args.redis_url})
    return settings


def _tool_store(settings: Settings) -> RedisStore:
    """The proxy's Redis store, as its settings configure it, without the canary watch
    (a one-off command reads no canary)."""
    from proxy.store.redis import RedisStore

    return RedisStore(settings.store.model_copy(update={"canary_interval": 0.0}))


async def _check_store(args: argparse.Namespace) -> int:
    from proxy.safety import assess, connection_findings, probe_commands, read_server_info
    from proxy.store import StoreUnavailable

    settings = _store_settings(args)
    if settings.store.url.startswith("memory://"):
        print("memory store: nothing to check (records live in one process only)")
        return 0
    store = _tool_store(settings)
    try:
        await store.start()
        info, denied = await read_server_info(store)
        findings = connection_findings(settings.store)
        findings += assess(info) if info else []
        findings += denied
        findings += await probe_commands(store)
    except StoreUnavailable as exc:
        print(f"{PROG}: store unavailable: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()
    unsafe = False
    for finding in findings:
        print(f"{finding.severity.upper():8} {finding.message}")
        unsafe |= finding.severity == "warning"
    return 1 if unsafe else 0


async def _records(args: argparse.Namespace) -> int:
    from proxy import keys
    from proxy.problems import Problem
    from proxy.records import StoredResponse
    from proxy.routes import RouteTable
    from proxy.store import CorruptRecord, StoreUnavailable

    settings = _store_settings(args)
    if settings.store.url.startswith("memory://"):
        raise ConfigError("records: needs --redis-url; the memory store lives inside the proxy")
    if args.action == "resolve":
        # What is stored here is replayed to clients as it is: a status no HTTP response
        # can have, or a header with a line break, would break every replay of the record.
        if not 200 <= args.status <= 599:
            raise ConfigError(f"--status: {args.status} is not a final HTTP status (200-599)")
        if not _PRINTABLE.fullmatch(args.content_type):
            raise ConfigError("--content-type: must be printable ASCII")
    hasher = keys.KeyHasher(settings.key_hash_secret)
    if args.hash is not None:
        try:
            storage_key = hasher.storage_key(args.hash.strip().lower())
        except ValueError as exc:
            raise ConfigError(f"--hash: {exc}") from None
        what = "this key_hash (is key_hash_secret the proxy's?)"
    else:
        table = RouteTable(settings.model_copy(update={"upstream": "http://unused"}))
        namespaces = {route.name: route.namespace for route in table.routes}
        if args.route not in namespaces:
            raise ConfigError(
                f"--route: no route named {args.route!r} (known: {', '.join(namespaces)})"
            )
        parts = next(r for r in table.routes if r.name == args.route).key.parts
        wanted = len(parts) if parts is not None else 1
        if len(args.key) != wanted:
            raise ConfigError(
                f"--key: the route {args.route!r} has a key of {wanted} part(s); "
                f"give --key {wanted} time(s), in the route's order"
            )
        try:
            given = [keys.validate(key) for key in args.key]
        except Problem as problem:  # the reason only: the key is on the operator's screen
            raise ConfigError(f"--key: {problem.detail}") from None
        key = keys.join_parts(given) if parts is not None else given[0]
        tenant = args.tenant
        if tenant is None and not settings.tenant.header:
            tenant = keys.DEFAULT_TENANT
        # The proxy reads the tenant header's bytes as latin-1; the operator's terminal
        # passes the same name's bytes (UTF-8 for `café`): read them the same way.
        scoped_tenant = None if tenant is None else os.fsencode(tenant).decode("latin-1")
        storage_key = hasher.scope(scoped_tenant, namespaces[args.route], key).storage_key
        shown = None if tenant is None else os.fsencode(tenant).decode("utf-8", "replace")
        what = f"this key (route {args.route}, tenant {shown})"
    store = _tool_store(settings)
    try:
        await store.start()
        if args.action == "show":
            try:
                record = await store.get(storage_key)
            except CorruptRecord as exc:
                print(
                    f"the record exists but cannot be read ({exc}); duplicates get 409 until "
                    "`records resolve --force` rewrites it or `records release --force` deletes it",
                    file=sys.stderr,
                )
                return 1
            if record is None:
                print(f"no record for {what}")
                return 1
            document = {"key_hash": hasher.log_hash(storage_key), **_record_json(record)}
            print(orjson.dumps(document, option=orjson.OPT_INDENT_2).decode())
            return 0
        try:
            if args.action == "resolve":
                response = StoredResponse(
                    args.status,
                    ((b"content-type", args.content_type.encode("latin-1")),),
                    # The bytes the shell passed, also when they are not UTF-8.
                    args.body.encode("utf-8", "surrogateescape"),
                )
                done = await store.resolve(storage_key, response, args.force)
            else:
                done = await store.discard(storage_key, args.force)
        except KeyError:
            print(f"no record for {what}", file=sys.stderr)
            return 1
        if not done:
            print(
                "refused: the record is not UNKNOWN; check `records show`, then use --force",
                file=sys.stderr,
            )
            return 1
        print(f"{args.action}d")
        return 0
    except StoreUnavailable as exc:
        print(f"{PROG}: store unavailable: {exc}", file=sys.stderr)
        return 2
    finally:
        await store.close()


_PRINTABLE = re.compile(r"[\x20-\x7e]+")


def _record_json(record: Record) -> dict[str, Any]:
    document: dict[str, Any] = {
        "state": record.state,
        "fence": record.fence,
        "fingerprint": record.fingerprint,
        "created_ms": record.created_ms,
        "lease_remaining_ms": record.lease_remaining_ms,
        "ttl_ms": record.ttl_ms,
        "reason": record.reason or None,
        "checks": record.checks,
    }
    if record.response is not None:
        body = record.response.body
        document["response"] = {
            "status": record.response.status,
            "headers": [
                [k.decode("latin-1"), v.decode("latin-1")] for k, v in record.response.headers
            ],
            "body_base64": base64.b64encode(body).decode(),
            "replayable": record.response.replayable,
        }
    return document
