"""Consul settings: the `consul` address rule, the advertised address, the agent address."""

from __future__ import annotations

import pytest

from gateway.settings import GatewaySettings
from services.runtime.consul import parse_consul_address, service_id
from services.runtime.settings import ServiceSettings, consul_service, load_settings
from services.worker.settings import WorkerSettings


def test_consul_names_a_service() -> None:
    assert consul_service("consul", "tensorgate-registry") == "tensorgate-registry"
    assert consul_service("consul:registry-eu", "tensorgate-registry") == "registry-eu"
    assert consul_service("consul:8500", "x") is None  # a host called consul, port 8500
    assert consul_service("10.0.0.1:50060", "x") is None


def test_gateway_finds_workers_registry_and_auth_through_consul() -> None:
    settings = GatewaySettings(
        consul="127.0.0.1:8500", workers=("consul",), registry="consul", auth="consul:auth-eu"
    )
    assert settings.worker_service == "tensorgate-worker"
    static = GatewaySettings(workers=("127.0.0.1:1",), allow_anonymous=True)
    assert static.worker_service is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "consul", "--allow-anonymous"], "--workers consul: set --consul"),
        (["--workers", "127.0.0.1:1", "--auth", "consul"], "--auth consul: set --consul"),
        (
            ["--workers", "consul,127.0.0.1:1", "--allow-anonymous", "--consul", "c:8500"],
            "give it alone",
        ),
        (
            [
                "--workers",
                "127.0.0.1:1",
                "--allow-anonymous",
                "--consul",
                "c:8500",
                "--host",
                "0.0.0.0",
            ],
            "--advertise-address: with --consul and --host 0.0.0.0",
        ),
        (
            ["--workers", "127.0.0.1:1", "--allow-anonymous", "--consul", "ftp://c:8500"],
            "--consul: 'ftp://c:8500' is not host:port or http(s)://host:port",
        ),
        (
            [
                "--workers",
                "127.0.0.1:1",
                "--allow-anonymous",
                "--registry",
                "consul:bad name",
                "--consul",
                "c:8500",
            ],
            "consul:NAME needs a Consul service name",
        ),
    ],
)
def test_refused_at_start_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(GatewaySettings, argv, env={})
    assert exited.value.code == 2
    assert message in capsys.readouterr().err


def test_worker_registry_through_consul_and_env() -> None:
    settings = load_settings(
        WorkerSettings,
        [],
        env={
            "TENSORGATE_WORKER_CONSUL": "https://agent:8501",
            "TENSORGATE_WORKER_REGISTRY": "consul",
        },
    )
    assert (settings.consul, settings.registry) == ("https://agent:8501", "consul")


def test_agent_address_and_service_id() -> None:
    assert parse_consul_address("127.0.0.1:8500") == ("http", "127.0.0.1", 8500)
    assert parse_consul_address("https://consul.local:8501") == ("https", "consul.local", 8501)
    with pytest.raises(ValueError, match="not a Consul agent address"):
        parse_consul_address("consul.local")
    assert service_id("tensorgate-worker", "[::1]:50052") == "tensorgate-worker-1-50052"
    assert ServiceSettings(consul="", host="0.0.0.0").consul == ""  # no Consul, no advertise
