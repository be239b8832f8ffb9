"""Builds and runs the auth/quota service: its store, its first admin key, the gRPC server."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import structlog
from tensorgate.auth.v1 import auth_pb2, auth_pb2_grpc

from services.auth.authenticator import AuthServiceAuthenticator
from services.auth.bootstrap import bootstrap_admin_key
from services.auth.key_changes import KeyChanges
from services.auth.servicer import AuthServiceServicer
from services.auth.settings import AuthSettings
from services.auth.store import AuthStore
from services.runtime.main import run_service
from services.runtime.metrics import ServiceMetrics
from services.runtime.server import ServiceBinding, StoredService, build_server
from services.store.database import database_url

log = structlog.get_logger("tensorgate.auth")

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class AuthServer(StoredService[AuthStore]):
    """A running auth service: its gRPC service over its store."""


async def start_auth(settings: AuthSettings) -> AuthServer:
    """Opens (and migrates) the store, makes the first admin key if asked, starts serving."""
    url = database_url(settings.database_url.get_secret_value(), settings.data_dir, "auth")
    store = await AuthStore.open(url)
    try:
        if settings.bootstrap_admin_key_file is not None:
            await bootstrap_admin_key(store, settings.bootstrap_admin_key_file)
        changes = KeyChanges()
        authenticator = AuthServiceAuthenticator(store)
        changes.listen(authenticator.forget)
        servicer = AuthServiceServicer(store, changes)
        service = build_server(
            settings,
            [ServiceBinding.of(auth_pb2_grpc.add_AuthServiceServicer_to_server, servicer)],
            name="auth",
            metrics=ServiceMetrics("auth"),
            authenticator=authenticator,
        )
        await service.start()
    except BaseException:
        await store.close()
        raise
    log.info("auth ready")
    return AuthServer(service=service, store=store)


def main(argv: Sequence[str] | None = None) -> int:
    return run_service(AuthSettings, start_auth, argv, prog="tensorgate-auth")


if __name__ == "__main__":
    sys.exit(main())
