"""`tensorgate up --workers N --gateways M` without starting anything: which ports, names,
folders and metrics ports each instance gets, and the bounds refused on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from launcher.cli import main
from launcher.local import LocalPlatform, instance_dir
from services.runtime.process import lasting_port


def test_one_of_each_keeps_the_names_and_ports_it_always_had() -> None:
    platform = LocalPlatform(gateway_port=50051, metrics_port=9400)
    assert platform.gateway_addresses == ["127.0.0.1:50051"]
    assert platform.gateway_names == ["gateway"] and platform.worker_names == ["worker"]
    assert platform.metrics_ports() == {
        "gateway": 9400,
        "worker": 9401,
        "registry": 9402,
        "auth": 9403,
    }


def test_several_gateways_take_consecutive_ports_and_every_service_a_metrics_port() -> None:
    platform = LocalPlatform(gateway_port=50100, workers=2, gateways=3, metrics_port=9400)
    assert platform.gateway_ports == [50100, 50101, 50102]
    assert platform.gateway_names == ["gateway-1", "gateway-2", "gateway-3"]
    assert platform.worker_names == ["worker-1", "worker-2"]
    assert len(set(platform.worker_ports)) == 2
    assert platform.metrics_ports() == {
        "gateway-1": 9400,
        "worker-1": 9401,
        "registry": 9402,
        "auth": 9403,
        "gateway-2": 9404,
        "gateway-3": 9405,
        "worker-2": 9406,
    }
    off = LocalPlatform(workers=2, gateways=2, metrics_port=-1).metrics_ports()
    assert set(off.values()) == {-1} and len(off) == 6


def test_port_0_gives_each_gateway_a_free_port() -> None:
    platform = LocalPlatform(gateway_port=0, gateways=2)
    assert 0 not in platform.gateway_ports and len(set(platform.gateway_ports)) == 2


def test_the_first_instance_keeps_the_plain_folder() -> None:
    # A data directory used with one worker and one gateway keeps their state with more.
    assert [instance_dir("worker", i) for i in range(3)] == ["worker", "worker-2", "worker-3"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--workers", "0"], "'--workers'"),
        (["--workers", "9"], "'--workers'"),
        (["--gateways", "0"], "'--gateways'"),
        (["--gateways", "3", "--port", "65534"], "gateways: 3 consecutive ports from 65534"),
    ],
)
def test_out_of_bounds_counts_are_refused_with_exit_2(
    args: list[str], error: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["up", "--data-dir", str(tmp_path), *args]) == 2
    assert error in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "nothing was started"


def test_service_ports_lie_below_the_ephemeral_range() -> None:
    # Else an outgoing connection may take a port while its service restarts.
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    platform = LocalPlatform(gateway_port=0, workers=2, gateways=2)
    ports = [*platform.gateway_ports, *platform.worker_ports, platform.registry_port]
    assert all(port < low for port in ports) and len(set(ports)) == len(ports)
    assert lasting_port() < low
