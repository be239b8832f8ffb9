"""TLS credentials from the PEM files a service's settings name.

Plaintext is the embedded default. A server with a certificate and key listens with
TLS; with a client CA as well it requires client certificates signed by that CA
(mutual TLS). A channel to another tensorgate service uses TLS when a CA to verify
it is configured, and presents a client certificate when one is configured.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: Path | None) -> bytes | None:
    return path.read_bytes() if path is not None else None


def server_credentials(
    cert_file: Path | None, key_file: Path | None, client_ca_file: Path | None
) -> grpc.ServerCredentials | None:
    """TLS for a server, mutual when `client_ca_file` is set; None means plaintext."""
    if cert_file is None or key_file is None:
        return None
    client_ca = _read(client_ca_file)
    return grpc.ssl_server_credentials(
        [(key_file.read_bytes(), cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> grpc.ChannelCredentials | None:
    """TLS for a channel to another service (with a client certificate for mTLS)."""
    if ca_file is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes(),
        private_key=_read(key_file),
        certificate_chain=_read(cert_file),
    )
