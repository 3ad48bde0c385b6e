"""The servers the project starts: Redis (single, Cluster, Sentinel), the sample backend and
the proxy, each a `ManagedProcess` on 127.0.0.1 that keeps its port across restarts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import redis
import redis.cluster
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from devstack.processes import (
    HOST,
    ManagedProcess,
    StackError,
    StartStop,
    child_env,
    free_port,
    free_port_pair,
    wait_for_http,
    wait_for_port,
)

REDIS_HINT = "apt-get install redis-server"


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
                raise StackError(f"openssl {args[0]} failed: {result.stderr}")

        ca_key, ca = directory / "ca.key", directory / "ca.crt"
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=test-ca", "-keyout", str(ca_key), "-out", str(ca),
        )  # fmt: skip
        files = {}
        for name, extension in (
            ("server", f"subjectAltName={','.join(server_names)}"),
            ("client", "extendedKeyUsage=clientAuth"),
        ):
            key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "crt"))
            ext_file = directory / f"{name}.ext"
            ext_file.write_text(extension + "\n")
            openssl(
                "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=test-{name}",
                "-keyout", str(key), "-out", str(csr),
            )  # fmt: skip
            openssl(
                "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                "-CAcreateserial", "-days", "2", "-extfile", str(ext_file), "-out", str(cert),
            )  # fmt: skip
            files[name] = (cert, key)
        return cls(ca, *files["server"], *files["client"])

    def server_args(self) -> list[str]:
        """redis-server options: TLS only, client certificates optional (as most managed
        Redis services: the password or ACL user authenticates)."""
        return [
            "--tls-cert-file", str(self.server_cert),
            "--tls-key-file", str(self.server_key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "optional",
        ]  # fmt: skip

    def cli_args(self) -> list[str]:
        return [
            "--tls",
            "--cacert", str(self.ca),
            "--cert", str(self.client_cert),
            "--key", str(self.client_key),
        ]  # fmt: skip

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


class PortServer(ManagedProcess):
    """A child serving on one 127.0.0.1 port, the same across restart()."""

    def __init__(
        self,
        workdir: Path,
        log_name: str,
        *,
        port: int | None,
        args: Sequence[str],
        ready_timeout: float,
        cpus: set[int] | None = None,
    ) -> None:
        super().__init__(workdir, log_name, cpus=cpus)
        self._port = port if port is not None else free_port()
        self.args = list(args)
        self.ready_timeout = ready_timeout

    @property
    def port(self) -> int:
        """TCP port; stays the same across restart()."""
        return self._port


# --------------------------------------------------------------------------- redis


def redis_command(
    port: int, workdir: Path, *, appendonly: bool = False, tls: TlsFiles | None = None
) -> list[str]:
    """The one redis-server command line: loopback only, no snapshots, AOF only when asked,
    never evicting (an evicted record would be a second execution), logs to stdout. With
    `tls` the port speaks only TLS (`--port 0 --tls-port P`), as a managed Redis does."""
    ports = ["--port", str(port)]
    if tls is not None:
        ports = ["--port", "0", "--tls-port", str(port), *tls.server_args()]
    return [
        "redis-server",
        *ports,
        "--bind", HOST,
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        "--dir", str(workdir),
        "--daemonize", "no",
        "--maxmemory-policy", "noeviction",
        "--loglevel", "warning",
        "--logfile", "",
    ]  # fmt: skip


class RedisServer(PortServer):
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
        cpus: set[int] | None = None,
        tls: TlsFiles | None = None,
    ) -> None:
        super().__init__(
            workdir, "redis.log", port=port, args=args, ready_timeout=ready_timeout, cpus=cpus
        )
        self.appendonly = appendonly
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
        """`redis_command` plus the extra args (later options win)."""
        argv = redis_command(self._port, self.workdir, appendonly=self.appendonly, tls=self.tls)
        return [*argv, *self.args]

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
                raise StackError(
                    f"redis-server on port {self._port} not ready within "
                    f"{self.ready_timeout}s (last: {last})\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def flushall(self) -> None:
        """Delete every key: a clean store for the next test."""
        with self.client() as client:
            client.flushall()


class RedisCluster(StartStop):
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
            raise StackError(f"{' '.join(cmd)} timed out") from exc
        if result.returncode != 0:
            raise StackError(
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
                raise StackError(f"cluster not ok within {self.ready_timeout}s: {last}")
            time.sleep(0.1)

    def client(self, **kwargs: Any) -> redis.cluster.RedisCluster:
        """A sync cluster client bootstrapped from every master."""
        kwargs.setdefault("socket_timeout", 5.0)
        if self.tls is not None:
            kwargs = {**self.tls.client_kwargs(), **kwargs}
        # redis-py leaves ClusterNode untyped.
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in self.startup_nodes]  # type: ignore[no-untyped-call]
        return redis.cluster.RedisCluster(startup_nodes=nodes, **kwargs)

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()

    def kill(self) -> None:
        """SIGKILL every node."""
        for node in self.nodes:
            node.kill()


class SentinelServer(ManagedProcess):
    """`redis-server sentinel.conf --sentinel` watching one master, optionally over TLS and
    with its own password (`requirepass` on the sentinel), with its own writable config
    file (Sentinel rewrites it as it learns the topology)."""

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
            f"sentinel parallel-syncs {master_name} 1",
        ]
        if tls is not None:
            args = tls.server_args()
            conf += [f"tls-port {self.port}", "tls-replication yes"]
            conf += [f"{args[i][2:]} {args[i + 1]}" for i in range(0, len(args), 2)]
        if password is not None:
            conf.append(f"requirepass {password}")
        self.conf = self.workdir / "sentinel.conf"
        self.conf.write_text("\n".join(conf) + "\n")

    def url_part(self) -> str:
        """``127.0.0.1:P``, one host of a ``redis+sentinel://`` URL."""
        return f"{HOST}:{self.port}"

    def command(self) -> list[str]:
        return ["redis-server", str(self.conf), "--sentinel"]

    def wait_ready(self) -> None:
        wait_for_port(HOST, self.port, 10.0, alive=self)

    def client(self) -> redis.Redis:
        extra: dict[str, Any] = self.tls.client_kwargs() if self.tls is not None else {}
        return redis.Redis(
            host=HOST,
            port=self.port,
            password=self.password,
            socket_timeout=2.0,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
            **extra,
        )

    def master_state(self) -> dict[str, Any]:
        with self.client() as client:
            state: dict[str, Any] = client.sentinel_master(self.master_name)
            return state

    def master_address(self) -> tuple[str, int] | None:
        with self.client() as client:
            address = client.sentinel_get_master_addr_by_name(self.master_name)
        return (str(address[0]), int(address[1])) if address else None


# --------------------------------------------------------------------------- http servers


class HttpServer(PortServer):
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
        cpus: set[int] | None = None,
    ) -> None:
        super().__init__(
            workdir, log_name, port=port, args=args, ready_timeout=ready_timeout, cpus=cpus
        )
        self.env = dict(env or {})

    @property
    def url(self) -> str:
        """``http://127.0.0.1:P``."""
        return f"http://{HOST}:{self._port}"

    def environment(self) -> dict[str, str]:
        """Inherited env plus the extra vars given at construction."""
        return child_env(self.env)

    def http(self, timeout: float = 10.0) -> httpx.Client:
        """A sync client bound to this server (ignores proxy env vars)."""
        return httpx.Client(verify=False, base_url=self.url, timeout=timeout, trust_env=False)


class BackendServer(HttpServer):
    """The sample payment backend, counting every charge in a SQLite ledger."""

    name = "sample_backend"

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        db: Path | str | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 15.0,
        log_name: str = "backend.log",
        cpus: set[int] | None = None,
    ) -> None:
        super().__init__(
            workdir,
            log_name,
            port=port,
            args=args,
            env=env,
            ready_timeout=ready_timeout,
            cpus=cpus,
        )
        # A path, or ":memory:" for a ledger that lives as long as the process.
        self.db = db if isinstance(db, str) else Path(db or self.workdir / "ledger.db")

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
        """``POST /v1/ledger/reset``: start from an empty ledger."""
        with self.http() as client:
            client.post("/v1/ledger/reset").raise_for_status()


class ProxyServer(HttpServer):
    """The idempotency proxy CLI (``python -m proxy run``) as a real process.

    Ready when its traffic port accepts connections; with ``wait_readyz`` also when its
    admin ``/readyz`` answers 200 (the store is reachable), which a proxy started on
    purpose with its store down never does.
    """

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
        wait_readyz: bool = False,
        name: str = "proxy",
        cpus: set[int] | None = None,
    ) -> None:
        super().__init__(
            workdir,
            f"{name}.log",
            port=port,
            args=args,
            env=env,
            ready_timeout=ready_timeout,
            cpus=cpus,
        )
        self.name = name
        self.upstream = upstream
        self.redis_url = redis_url
        self.admin_port = admin_port if admin_port is not None else free_port()
        self.log_level = log_level
        self.wait_readyz = wait_readyz
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = self.workdir / f"{name}-config.yaml"
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
        deadline = time.monotonic() + self.ready_timeout
        wait_for_port(HOST, self._port, self.ready_timeout, alive=self)
        if self.wait_readyz:
            left = max(0.1, deadline - time.monotonic())
            wait_for_http(f"{self.admin_url}/readyz", left, alive=self)
