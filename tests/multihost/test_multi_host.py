"""tensorgate across hosts: every part on a host of its own (a network namespace, joined
to the others by a bridge; tests/multihost/network.py), talking over the network as in
production, TLS on the gateways and mutual TLS between the services.

    db      PostgreSQL (registry and auth state) and Redis (quota counters)
    control registry and auth, on PostgreSQL
    worker1 worker with its own Triton        worker2 the same
    gw1     gateway                           gw2     gateway
    client  the caller (tests/multihost/client.py)
    bridge  the Consul HTTP double (tests/consul_double.py), which runs every service's
            gRPC health check over (m)TLS as an agent does

From the client host: the demo models are registered and deployed and a key with a
quota is made through a gateway; both gateways serve the key exactly its quota;
generations stream and Infer calls run through gateway 2 while worker 1's host is
cut off (its veth down): every Infer succeeds, the streams that were on worker 1 end
UNAVAILABLE after tokens and the others finish; gateway 1's host is cut off and the
client's retry on gateway 2 succeeds.

Each process logs to a file in the test's directory; TENSORGATE_KEEP_MULTIHOST=1 keeps
that directory (its path is in the test's output) to read after a failure.

Needs root for `ip netns`; elsewhere it skips saying why. PostgreSQL's binaries and
redis-server come from Debian's packages (postgresql, redis-server): CI must have them
and fails without; elsewhere their absence skips.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.consul_double import ConsulDouble
from tests.helpers import until
from tests.multihost.client import QUOTA
from tests.multihost.network import Network, NetworkUnavailable, sigterm_interrupts
from tests.tls_certs import CertificateAuthority

REPO = Path(__file__).resolve().parents[2]
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
HOSTS = ("db", "control", "worker1", "worker2", "gw1", "gw2", "client")
PORTS = {"gateway": 50051, "worker": 50052, "registry": 50053, "auth": 50054}
CHECK_S = 0.5  # Consul check interval: a host cut off leaves the healthy set this fast
START_S = 240.0  # two Tritons loading torch at once on a busy 2-core machine

pytestmark = pytest.mark.timeout(600)


def _missing() -> str | None:
    why = Network.unavailable()
    if why is not None:
        return why  # skipped even on CI: there is no way around it
    if not (POSTGRES_BIN / "initdb").exists() or shutil.which("redis-server") is None:
        missing = (
            "PostgreSQL 15's binaries or redis-server (apt-get install postgresql redis-server)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(f"{missing} missing; CI must run the multi-host test")
        return f"{missing} not installed"
    return None


@dataclass
class Platform:
    network: Network
    double: ConsulDouble
    directory: Path
    ca_file: Path
    admin_key_file: Path

    def address(self, host: str, service: str) -> str:
        return f"{self.network.host(host).address}:{PORTS[service]}"

    def passing(self, name: str) -> int:
        return sum(
            r.name == f"tensorgate-{name}" and r.status == "passing"
            for r in self.double.services.values()
        )

    def models_on_workers(self) -> list[str]:
        return [
            r.meta.get("models", "")
            for r in self.double.services.values()
            if r.name == "tensorgate-worker"
        ]


def _postgres_directory(directory: Path) -> Path:
    """A directory the postgres user owns and can reach (mkdtemp's is root's alone)."""
    data = directory / "postgres"
    data.mkdir()
    directory.chmod(0o755)
    shutil.chown(data, "postgres")
    return data


async def _start_databases(network: Network, directory: Path) -> tuple[str, str]:
    """Private PostgreSQL and Redis on the db host; their URLs."""
    db = network.host("db")
    data = _postgres_directory(directory)
    initdb = f"{POSTGRES_BIN / 'initdb'} -D {data / 'db'} -A trust -U tensorgate --no-sync"
    initdb_done = await db.start(initdb.split(), log=directory / "initdb.log", user="postgres")
    redis = f"redis-server --bind {db.address} --port 6379 --appendonly no --protected-mode no"
    await db.start([*redis.split(), "--save", ""], log=directory / "redis.log")
    assert await initdb_done.wait() == 0, (directory / "initdb.log").read_text()
    # initdb's own entries are for local and loopback connections only.
    with (data / "db" / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {network.subnet}.0/24 trust\n")
    postgres = (
        f"{POSTGRES_BIN / 'postgres'} -D {data / 'db'} -c listen_addresses={db.address} "
        f"-c unix_socket_directories={data} -c fsync=off"
    )
    await db.start(
        postgres.split(),
        log=directory / "postgres.log",
        user="postgres",
        stop_signal=signal.SIGINT,  # fast shutdown: it does not wait for clients
    )
    url = f"postgresql://tensorgate@{db.address}:5432/postgres"
    for _ in range(300):
        try:
            await (await asyncpg.connect(url, timeout=2)).close()
            break
        except (OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.1)
    else:
        log = (directory / "postgres.log").read_text()
        raise AssertionError(f"PostgreSQL did not start: {log}")
    return url, f"redis://{db.address}:6379/0"


def _service_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENSORGATE_")}
    env["PYTHONPATH"] = str(REPO)
    return env


async def _start_services(
    p: Platform, database_url: str, redis_url: str, ca: CertificateAuthority
) -> None:
    """Registry and auth on the control host, a worker on each worker host (each
    launches its own Triton), a gateway on each gateway host; all found through Consul.
    Paths here have no spaces (mkdtemp under /tmp), so flags are written as one string."""
    net, directory = p.network, p.directory

    def flags(host: str, service: str) -> list[str]:
        address = net.host(host).address
        common = (
            f"--host {address} --port {PORTS[service]} --consul {p.double.address} "
            f"--consul-check-interval {CHECK_S}s --metrics-port -1 --drain-seconds 0 "
            "--grace-seconds 2 --log-format json"
        )
        # Every server serves TLS with a certificate for its address; every service
        # verifies what it calls with the CA and presents a client certificate.
        cert, client = ca.server(f"{host}-{service}", (address,)), ca.client(f"{host}-{service}-c")
        tls = (
            f"--tls-cert-file {cert.cert_file} --tls-key-file {cert.key_file} "
            f"--upstream-ca-file {ca.cert_file} --upstream-cert-file {client.cert_file} "
            f"--upstream-key-file {client.key_file}"
        )
        if service != "gateway":  # mutual TLS behind the gateway
            tls += f" --tls-client-ca-file {ca.cert_file}"
        return f"{common} {tls}".split()

    starts = [
        ("control", "registry", f"--database-url {database_url} --data-dir {directory}/registry"),
        (
            "control",
            "auth",
            f"--database-url {database_url} --data-dir {directory}/auth "
            f"--bootstrap-admin-key-file {p.admin_key_file}",
        ),
    ]
    for host in ("worker1", "worker2"):
        starts.append(
            (host, "worker", f"--registry consul --data-dir {directory}/{host} --retire-seconds 1")
        )
    for host in ("gw1", "gw2"):
        starts.append(
            (
                host,
                "gateway",
                f"--workers consul --registry consul --auth consul --redis-url {redis_url} "
                f"--data-dir {directory}/{host} --price-refresh-seconds 1",
            )
        )
    for host, service, args in starts:
        module = "gateway" if service == "gateway" else f"services.{service}"
        command = [sys.executable, "-m", module, *flags(host, service), *args.split()]
        # Stopped as machines are switched off: how they shut down is tested elsewhere
        # (tests/e2e/test_failover.py), and a graceful stop costs this test seconds.
        await net.host(host).start(
            command,
            log=directory / f"{host}-{service}.log",
            env=_service_env(),
            stop_signal=signal.SIGKILL,
        )


@pytest.fixture(scope="module")
async def platform() -> AsyncIterator[Platform]:
    why = _missing()
    if why is not None:
        pytest.skip(why)
    network = Network()
    directory = Path(tempfile.mkdtemp(prefix="tg-multihost-"))
    print(f"multi-host test: certificates and logs in {directory}")
    double: ConsulDouble | None = None
    # A cancelled run (SIGTERM) cleans up as one stopped with Ctrl-C does.
    with sigterm_interrupts():
        try:
            try:
                network.create(HOSTS)
            except NetworkUnavailable as exc:
                pytest.skip(str(exc))
            ca = CertificateAuthority("multihost", directory)
            checker = ca.client("consul-agent")
            double = ConsulDouble(
                tls_ca=ca.pem,
                tls_client=(checker.key_file.read_bytes(), checker.cert_file.read_bytes()),
                host=network.gateway_address,
            )
            await double.start()
            p = Platform(network, double, directory, ca.cert_file, directory / "admin.key")
            database_url, redis_url = await _start_databases(network, directory)
            await _start_services(p, database_url, redis_url, ca)
            await until(
                lambda: all(
                    p.passing(s) == n
                    for s, n in (("registry", 1), ("auth", 1), ("gateway", 2), ("worker", 2))
                ),
                "every service passing its Consul check",
                timeout=START_S,
            )
            yield p
        finally:
            await network.close()
            if double is not None:
                await double.stop()
            if not os.environ.get("TENSORGATE_KEEP_MULTIHOST"):
                shutil.rmtree(directory, ignore_errors=True)


async def _health(address: str, credentials: grpc.ChannelCredentials | None) -> str:
    """The status of a health Check at `address`, or the gRPC error code it ended with."""
    if credentials is None:
        channel = grpc.aio.insecure_channel(address)
    else:
        channel = grpc.aio.secure_channel(address, credentials)
    async with channel:
        try:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return name


async def _check_tls_is_required(p: Platform) -> None:
    """The gateways answer TLS only; registry, auth and workers only callers with a
    certificate of the CA (what the services present to each other)."""
    verified = grpc.ssl_channel_credentials(p.ca_file.read_bytes())
    assert await _health(p.address("gw2", "gateway"), verified) == "SERVING"
    assert await _health(p.address("gw2", "gateway"), None) == "UNAVAILABLE"
    for host, service in (("control", "registry"), ("control", "auth"), ("worker2", "worker")):
        address = p.address(host, service)
        assert await _health(address, verified) == "UNAVAILABLE", (service, "no certificate")
        assert await _health(address, None) == "UNAVAILABLE", (service, "plaintext")


class ClientHost:
    """tests/multihost/client.py running on the client host: `await ask(command)`."""

    def __init__(self, process: asyncio.subprocess.Process, log: Path) -> None:
        self._process = process
        self._log = log

    async def ask(self, command: str, timeout: float = 180.0) -> dict[str, object]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(f"{command}\n".encode())
        await self._process.stdin.drain()
        line = await asyncio.wait_for(self._process.stdout.readline(), timeout)
        assert line, f"the client host's process ended; its log:\n{self._log.read_text()[-3000:]}"
        answer: dict[str, object] = json.loads(line)
        assert "error" not in answer, answer["error"]
        return answer


async def test_across_hosts(platform: Platform) -> None:
    p, net = platform, platform.network
    await _check_tls_is_required(p)
    log = p.directory / "client.log"
    process = await net.host("client").start(
        [
            sys.executable,
            "-m",
            "tests.multihost.client",
            p.address("gw1", "gateway"),
            p.address("gw2", "gateway"),
            str(p.ca_file),
            str(p.admin_key_file),
        ],
        log=log,
        env=_service_env(),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    client = ClientHost(process, log)

    await client.ask("setup")
    # Each worker loads what the registry deploys and publishes it in its Consul Meta.
    await until(
        lambda: all("tinylm" in m and "digits" in m for m in p.models_on_workers()),
        "both workers serving both deployed models",
        timeout=START_S,
    )

    await client.ask("ready")
    # One Redis behind both gateways: exactly QUOTA calls, whichever gateway took them.
    codes = (await client.ask("quota"))["codes"]
    assert codes == ["OK"] * QUOTA + ["RESOURCE_EXHAUSTED"] * 2, codes

    await client.ask("load")
    net.host("worker1").cut()
    net.host("gw1").cut()
    retried = await client.ask("retry")
    assert retried["first"] in ("DEADLINE_EXCEEDED", "UNAVAILABLE") and retried["retry"] == "OK", (
        retried
    )

    seen = await client.ask("settle")
    print(f"quota {codes}; retry {retried}; load {seen}")
    assert seen["other"] == [], seen  # every Infer succeeded; no stream ended otherwise
    cut = seen["cut"]
    assert isinstance(cut, list) and cut and set(cut) == {"UNAVAILABLE"}, seen  # worker 1's
    assert seen["finished"] and seen["unary_ok"], seen  # worker 2's streams and calls
    assert p.passing("worker") == 1 and p.passing("gateway") == 1
