"""TLS end to end, with a CA and certificates made at run time (tests/tls_certs.py).

A worker that requires client certificates from the test CA (mutual TLS), and a
gateway that listens with TLS and presents a client certificate to it. Clients that
trust the CA get through; plaintext clients, clients that trust another CA and a
gateway without a client certificate are refused.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from tensorgate import AsyncGatewayClient, GatewayClient
from tensorgate.errors import UnavailableError
from tensorgate.inference.v1 import inference_pb2

from gateway import server as gateway_server
from gateway.server import Gateway, start_gateway
from gateway.settings import GatewaySettings
from services.worker import server as worker_server
from services.worker.server import Worker, start_worker
from services.worker.triton_process import BundledTriton
from tests.conftest import REPO, worker_settings
from tests.helpers import grpcurl_path
from tests.tls_certs import CertificateAuthority, IssuedCertificate

DIGITS = np.asarray(json.loads((REPO / "models/examples/digits.json").read_text()), np.float32)


@dataclass(frozen=True)
class Certificates:
    ca: CertificateAuthority
    other_ca: CertificateAuthority  # unrelated to `ca`: trusts nothing it signed
    gateway: IssuedCertificate  # the gateway's server certificate
    worker: IssuedCertificate  # the worker's server certificate
    gateway_client: IssuedCertificate  # what the gateway presents to the worker
    stranger_client: IssuedCertificate  # a client certificate `other_ca` signed


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")
    ca = CertificateAuthority("tensorgate", directory)
    other_ca = CertificateAuthority("other", directory)
    return Certificates(
        ca=ca,
        other_ca=other_ca,
        gateway=ca.server("gateway"),
        worker=ca.server("worker"),
        gateway_client=ca.client("gateway-client"),
        stranger_client=other_ca.client("stranger"),
    )


@pytest.fixture(scope="module")
async def mtls_worker(triton: BundledTriton, certs: Certificates) -> AsyncIterator[Worker]:
    worker = await start_worker(
        worker_settings(
            triton,
            tls_cert_file=certs.worker.cert_file,
            tls_key_file=certs.worker.key_file,
            tls_client_ca_file=certs.ca.cert_file,
        )
    )
    yield worker
    await worker.stop()


@pytest.fixture(scope="module")
async def tls_gateway(mtls_worker: Worker, certs: Certificates) -> AsyncIterator[Gateway]:
    gateway = await start_gateway(
        GatewaySettings(
            allow_anonymous=True,
            workers=(mtls_worker.address,),
            metrics_port=0,
            drain_seconds=0.0,
            grace_seconds=2.0,
            tls_cert_file=certs.gateway.cert_file,
            tls_key_file=certs.gateway.key_file,
            upstream_ca_file=certs.ca.cert_file,
            upstream_cert_file=certs.gateway_client.cert_file,
            upstream_key_file=certs.gateway_client.key_file,
        )
    )
    yield gateway
    await gateway.stop()


def _credentials(
    ca: CertificateAuthority, client: IssuedCertificate | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.pem,
        private_key=client.key_file.read_bytes() if client else None,
        certificate_chain=client.cert_file.read_bytes() if client else None,
    )


async def _health(
    address: str, credentials: grpc.ChannelCredentials | None, service: str = ""
) -> str:
    """The health status name, or the status code of the failed Check."""
    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        try:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


# --- 1. server TLS on the gateway ------------------------------------------------------


async def test_client_trusting_the_ca_streams_and_infers(
    tls_gateway: Gateway, certs: Certificates
) -> None:
    async with AsyncGatewayClient(tls_gateway.address, root_certificates=certs.ca.pem) as client:
        chunks = [
            c async for c in client.generate("tinylm", "ROMEO:", max_tokens=8, seed=1, timeout=30)
        ]
        labels = (await client.infer("digits", {"image": DIGITS}, timeout=30))["label"]
        # The gateway listed the worker's models: its client certificate got it through.
        models = {m.name for m in await client.list_models()}
    assert chunks[-1].finish_reason != inference_pb2.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks) > 0
    assert labels.ravel().tolist() == [0, 1, 2, 3]
    assert {"tinylm", "digits"} <= models


async def test_plaintext_client_is_refused(tls_gateway: Gateway) -> None:
    async with AsyncGatewayClient(tls_gateway.address) as client:
        with pytest.raises(UnavailableError):
            await client.list_models()


async def test_client_trusting_another_ca_is_refused(
    tls_gateway: Gateway, certs: Certificates
) -> None:
    async with AsyncGatewayClient(
        tls_gateway.address, root_certificates=certs.other_ca.pem
    ) as client:
        with pytest.raises(UnavailableError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.list_models()


async def test_sync_client_trusting_the_ca(tls_gateway: Gateway, certs: Certificates) -> None:
    # By host name this time: the certificate names localhost (DNS) and 127.0.0.1 (IP).
    address = f"localhost:{_port(tls_gateway.address)}"

    def calls() -> tuple[list[inference_pb2.GenerateChunk], npt.NDArray[np.generic]]:
        with GatewayClient(address, root_certificates=certs.ca.pem) as client:
            chunks = list(client.generate("tinylm", "ROMEO:", max_tokens=8, seed=1, timeout=30))
            return chunks, client.infer("digits", {"image": DIGITS}, timeout=30)["label"]

    # A blocking client, off the event loop the gateway runs on.
    chunks, labels = await asyncio.to_thread(calls)
    assert chunks[-1].usage.completion_tokens == sum(len(c.token_ids) for c in chunks) > 0
    assert labels.ravel().tolist() == [0, 1, 2, 3]


# --- 2. mutual TLS between gateway and worker ----------------------------------------------


@pytest.mark.parametrize("client", ["no-client-cert", "client-cert-from-another-ca"])
async def test_gateway_without_an_accepted_client_certificate_cannot_use_the_worker(
    mtls_worker: Worker, certs: Certificates, client: str
) -> None:
    stranger = certs.stranger_client if client == "client-cert-from-another-ca" else None
    gateway = await start_gateway(
        GatewaySettings(
            allow_anonymous=True,
            workers=(mtls_worker.address,),
            metrics_port=0,
            drain_seconds=0.0,
            grace_seconds=2.0,
            upstream_ca_file=certs.ca.cert_file,
            upstream_cert_file=stranger.cert_file if stranger else None,
            upstream_key_file=stranger.key_file if stranger else None,
        )
    )
    try:
        async with AsyncGatewayClient(gateway.address) as caller:
            # The worker refuses every connection, so the gateway never learns what it
            # has loaded: nothing is listed, and a call is UNAVAILABLE (not NOT_FOUND:
            # the model may well be on the worker it cannot reach).
            assert await caller.list_models() == []
            with pytest.raises(UnavailableError) as infer_error:
                await caller.infer("digits", {"image": DIGITS}, timeout=30)
            with pytest.raises(UnavailableError) as generate_error:
                async for _ in caller.generate("tinylm", "ROMEO:", max_tokens=8, timeout=30):
                    pass
    finally:
        await gateway.stop()
    unreached = "is not on any reachable worker, and 1 worker(s) could not be reached yet"
    assert infer_error.value.message.startswith(f"model 'digits' {unreached}")
    assert generate_error.value.message.startswith(f"model 'tinylm' {unreached}")


async def test_worker_refuses_channels_without_a_client_certificate(
    mtls_worker: Worker, certs: Certificates
) -> None:
    address = mtls_worker.address
    assert await _health(address, None) == "UNAVAILABLE"
    assert await _health(address, _credentials(certs.ca)) == "UNAVAILABLE"
    assert await _health(address, _credentials(certs.ca, certs.stranger_client)) == "UNAVAILABLE"
    assert await _health(address, _credentials(certs.ca, certs.gateway_client)) == "SERVING"


async def _first_bytes(
    port: int, ca: CertificateAuthority, client: IssuedCertificate | None
) -> bytes:
    """What a TLS 1.3 connection to `port` receives first (b"" when it is closed)."""
    context = ssl.create_default_context(cafile=ca.cert_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    if client is not None:
        context.load_cert_chain(client.cert_file, client.key_file)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
    try:
        return await asyncio.wait_for(reader.read(9), timeout=10)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


async def test_worker_refuses_the_tls_handshake_without_a_client_certificate(
    mtls_worker: Worker, certs: Certificates
) -> None:
    port = _port(mtls_worker.address)
    # TLS 1.3 lets the client finish its side first; the server checks the client's
    # certificate after that and, finding none, closes before a byte of HTTP/2.
    assert await _first_bytes(port, certs.ca, None) == b""
    # With one, the server's first bytes are HTTP/2's: a SETTINGS frame (type 4).
    assert (await _first_bytes(port, certs.ca, certs.gateway_client))[3] == 0x04


# --- 3. health and reflection over TLS -----------------------------------------------------


async def test_health_over_tls(
    tls_gateway: Gateway, mtls_worker: Worker, certs: Certificates
) -> None:
    gateway_tls = _credentials(certs.ca)
    assert await _health(tls_gateway.address, gateway_tls) == "SERVING"
    assert await _health(tls_gateway.address, gateway_tls, gateway_server.SERVICE_NAME) == "SERVING"
    worker_mtls = _credentials(certs.ca, certs.gateway_client)
    assert await _health(mtls_worker.address, worker_mtls, worker_server.SERVICE_NAME) == "SERVING"


async def test_reflection_over_tls(tls_gateway: Gateway, certs: Certificates) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async with grpc.aio.secure_channel(tls_gateway.address, _credentials(certs.ca)) as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([request]), timeout=10
        )
        responses = [response async for response in call]
    services = {s.name for r in responses for s in r.list_services_response.service}
    assert {gateway_server.SERVICE_NAME, "grpc.health.v1.Health"} <= services


# --- 4. grpcurl ---------------------------------------------------------------------------


async def _grpcurl(*args: str | Path) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        grpcurl_path(),
        "-max-time",
        "30",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_grpcurl_lists_services_with_the_ca(
    tls_gateway: Gateway, certs: Certificates
) -> None:
    code, out, err = await _grpcurl("-cacert", certs.ca.cert_file, tls_gateway.address, "list")
    assert code == 0, err
    assert {gateway_server.SERVICE_NAME, "grpc.health.v1.Health"} <= set(out.split())


async def test_grpcurl_is_refused_without_the_ca(tls_gateway: Gateway) -> None:
    code, _, err = await _grpcurl(tls_gateway.address, "list")
    assert code != 0
    assert "certificate signed by unknown authority" in err
    code, _, err = await _grpcurl("-plaintext", tls_gateway.address, "list")
    assert code != 0


async def test_grpcurl_with_a_client_certificate_lists_the_worker(
    mtls_worker: Worker, certs: Certificates
) -> None:
    ca = ("-cacert", certs.ca.cert_file)
    client = ("-cert", certs.gateway_client.cert_file, "-key", certs.gateway_client.key_file)
    code, out, err = await _grpcurl(*ca, *client, mtls_worker.address, "list")
    assert code == 0, err
    assert worker_server.SERVICE_NAME in out.split()
    code, _, err = await _grpcurl(*ca, mtls_worker.address, "list")
    assert code != 0
