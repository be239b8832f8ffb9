"""A refused key on the command line: the CLI's one error line says where the command
takes its key from, not only how a key travels on the wire (the server's words)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from launcher.cli import main
from services.runtime.api_keys import KEY_REFUSED


def _refuse(request: bytes, context: Any) -> bytes:
    context.abort(grpc.StatusCode.UNAUTHENTICATED, KEY_REFUSED)
    raise AssertionError("abort raises")


@pytest.fixture
def refusing_address() -> Iterator[str]:
    """An auth service that refuses every key, as the real one does a missing key."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    refusing = grpc.method_handlers_generic_handler(
        "tensorgate.auth.v1.AuthService",
        {"ListApiKeys": grpc.unary_unary_rpc_method_handler(_refuse)},
    )
    server.add_generic_rpc_handlers((refusing,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_a_refused_key_says_where_the_cli_takes_it_from(
    refusing_address: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TENSORGATE_API_KEY", raising=False)
    assert main(["keys", "list", "--address", refusing_address]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: UNAUTHENTICATED")
    assert "--api-key" in err and "TENSORGATE_API_KEY" in err
