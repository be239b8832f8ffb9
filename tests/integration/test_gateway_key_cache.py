"""The gateway's key cache against a real auth service (port 0, SQLite): one entry and
one lookup per key, whatever spelling of the authorization header carries it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from gateway.authentication import KeyAuthenticator
from services.auth.server import start_auth
from services.auth.settings import AuthSettings
from services.runtime.api_keys import new_key
from services.runtime.calls import Call
from services.runtime.errors import Unauthenticated
from tests.helpers import gateway_call


def _call(header: str) -> Call:
    return gateway_call("Infer", metadata=(("authorization", header),))


@pytest.fixture
async def admin_key_and_auth(tmp_path: Path) -> AsyncIterator[tuple[str, KeyAuthenticator]]:
    server = await start_auth(
        AuthSettings(
            data_dir=tmp_path,
            metrics_port=-1,
            drain_seconds=0.0,
            grace_seconds=1.0,
            bootstrap_admin_key_file=tmp_path / "admin.key",
        )
    )
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            authenticator = KeyAuthenticator(channel, cache_seconds=30.0)
            try:
                yield (tmp_path / "admin.key").read_text().strip(), authenticator
            finally:
                await authenticator.close()
    finally:
        await server.stop()


async def test_spellings_of_one_key_share_one_cache_entry_and_one_lookup(
    admin_key_and_auth: tuple[str, KeyAuthenticator], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, authenticator = admin_key_and_auth
    asked: list[str] = []
    ask = authenticator._ask

    async def counted(sent: str) -> object:
        asked.append(sent)
        return await ask(sent)

    monkeypatch.setattr(authenticator, "_ask", counted)
    # The scheme in any case and any spaces around the key: one key, one cache entry (one
    # key must not be able to fill the cache and push other callers' keys out of it).
    spellings = [f"Bearer {key}", f"bearer {key}", f"BEARER {key}", f"Bearer   {key}  "]
    principals = {(await authenticator.authenticate(_call(h))).key_id for h in spellings}
    assert len(principals) == 1
    assert asked == [key]
    assert len(authenticator._cache) == 1


async def test_the_usual_spelling_with_a_bad_key_is_refused(
    admin_key_and_auth: tuple[str, KeyAuthenticator],
) -> None:
    key, authenticator = admin_key_and_auth
    _, unknown = new_key()
    # Same length as a key after "Bearer ": cut without a regex, then still judged.
    # The last character changed (never to itself: a key may well end in any letter).
    changed = key[:-1] + ("y" if key[-1] != "y" else "z")
    for header in (f"Bearer {unknown}", f"Bearer  {key[:-1]}", f"Bearer {changed}"):
        with pytest.raises(Unauthenticated):
            await authenticator.authenticate(_call(header))
    assert len(authenticator._cache) == 0
