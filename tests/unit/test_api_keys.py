"""The API key format (services.runtime.api_keys): made, parsed, checked, read from metadata."""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable

import pytest

from services.runtime.api_keys import (
    KEY_LENGTH,
    ParsedKey,
    bearer_key,
    hash_secret,
    new_key,
    parse_key,
    secret_matches,
)

_SHAPE = re.compile(r"tg_([a-z2-7]{12})_([0-9A-Za-z]{43})_([0-9A-Za-z]{6})")


def _base62(number: int, width: int) -> str:
    alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    digits = ""
    while number:
        number, digit = divmod(number, 62)
        digits = alphabet[digit] + digits
    return digits.rjust(width, "0")


def test_new_keys_have_the_documented_shape_and_checksum() -> None:
    for _ in range(200):
        key_id, key = new_key()
        match = _SHAPE.fullmatch(key)
        assert match is not None and len(key) == KEY_LENGTH == 66
        assert match.group(1) == key_id
        body = key.rsplit("_", 1)[0]
        assert match.group(3) == _base62(zlib.crc32(body.encode()), 6)


def test_new_keys_are_unique() -> None:
    made = [new_key() for _ in range(500)]
    assert len({key_id for key_id, _ in made}) == len({key for _, key in made}) == 500


def test_parse_key_returns_id_and_secret() -> None:
    key_id, key = new_key()
    parsed = parse_key(key)
    assert parsed == ParsedKey(key_id, key.split("_")[2])
    # Its repr never shows the secret (tracebacks, debug prints).
    assert parsed is not None and parsed.secret not in repr(parsed)


def _flip(text: str, index: int) -> str:
    replacement = "b" if text[index] != "b" else "c"
    return text[:index] + replacement + text[index + 1 :]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda key: "",
        lambda key: key[:-1],
        lambda key: key + "x",
        lambda key: " " + key[1:],
        lambda key: "TG" + key[2:],
        lambda key: key.replace("_", "-"),
        lambda key: key.upper(),
        lambda key: _flip(key, 5),  # in the key id
        lambda key: _flip(key, 30),  # in the secret
        lambda key: _flip(key, len(key) - 1),  # in the checksum
        lambda key: "x" * 1_000_000,
        lambda key: key[:20] + "é" + key[21:],
    ],
)
def test_malformed_or_mistyped_keys_parse_to_none(mutate: Callable[[str], str]) -> None:
    _, key = new_key()
    assert parse_key(mutate(key)) is None


def test_secret_hash_is_sha256_hex_and_matches_only_its_secret() -> None:
    stored = hash_secret("s3cret")
    assert re.fullmatch(r"[0-9a-f]{64}", stored)
    assert secret_matches(stored, "s3cret")
    assert not secret_matches(stored, "s3creT")
    assert not secret_matches(stored, "")


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        ((("authorization", "Bearer tg_abc"),), "tg_abc"),
        ((("authorization", "bearer tg_abc"),), "tg_abc"),
        ((("authorization", "BEARER   tg_abc "),), "tg_abc"),
        ((("x-request-id", "1"), ("authorization", "Bearer tg_abc")), "tg_abc"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), None),
        ((("authorization", "Bearer"),), None),
        ((("authorization", "Bearer a b"),), None),
        ((("authorization", b"Bearer tg_abc"),), None),
        ((), None),
    ],
)
def test_bearer_key(metadata: tuple[tuple[str, str | bytes], ...], expected: str | None) -> None:
    assert bearer_key(metadata) == expected
