"""What the `tensorgate` CLI's client commands share: where to connect, the key, the
arguments the registry commands have in common, one way to run a registry or an auth
call, and the error a command raises when its command line cannot be acted on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from tensorgate.auth_client import AsyncAuthClient
from tensorgate.registry_client import AsyncRegistryClient

DEFAULT_ADDRESS = "127.0.0.1:50051"

DataDir = Annotated[Path, typer.Option(help="where the services keep their state and logs")]

Address = Annotated[
    str,
    typer.Option(
        "--address",
        # --gateway is what the commands took before the registry's came; scripts use it.
        "--gateway",
        envvar="TENSORGATE_ADDRESS",
        metavar="HOST:PORT",
        help="the gateway (host:port); it forwards the registry's and the auth service's calls too",
    ),
]
ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key",
        envvar="TENSORGATE_API_KEY",
        metavar="KEY",
        help="sent as `authorization: Bearer <key>`; `tensorgate up` keeps the admin key "
        "in .data/auth/admin.key",
        show_default=False,
    ),
]

Name = Annotated[str, typer.Argument(metavar="NAME", help="the model's name")]
AliasName = Annotated[str, typer.Argument(metavar="ALIAS", help="the alias, e.g. production")]
Reason = Annotated[str, typer.Option(help="why; recorded with the move")]
Labels = Annotated[
    list[str] | None, typer.Option("--label", metavar="KEY=VALUE", help="KEY=VALUE (repeatable)")
]
Ref = Annotated[
    str, typer.Argument(metavar="REF", help="name (newest version), name:3 or name@alias")
]

_T = TypeVar("_T")


def with_registry(
    address: str, api_key: str | None, work: Callable[[AsyncRegistryClient], Awaitable[_T]]
) -> _T:
    """Runs `work` on a registry client over one channel, closed after."""

    async def run() -> _T:
        async with AsyncRegistryClient(address, api_key=api_key) as registry:
            return await work(registry)

    return asyncio.run(run())


def with_auth(
    address: str, api_key: str | None, work: Callable[[AsyncAuthClient], Awaitable[_T]]
) -> _T:
    """Runs `work` on an auth client over one channel, closed after."""

    async def run() -> _T:
        async with AsyncAuthClient(address, api_key=api_key) as auth:
            return await work(auth)

    return asyncio.run(run())


class UsageError(Exception):
    """A command line the CLI cannot act on; the message says what to write instead."""


def parse_labels(specs: list[str] | None) -> dict[str, str]:
    """--label k=v, given any number of times."""
    labels: dict[str, str] = {}
    for spec in specs or ():
        key, sep, value = spec.partition("=")
        if not sep or not key:
            raise UsageError(f"--label {spec!r}: write KEY=VALUE")
        labels[key] = value
    return labels


def parse_time(text: str, flag: str) -> datetime:
    """An ISO 8601 time; one without a UTC offset is taken as local time."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(
            f"{flag} {text!r}: write an ISO 8601 time such as 2025-06-01T14:30 "
            "or 2025-06-01T12:30:00Z"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()
