"""The first admin key: made on a first start, written to a file, never logged.

`tensorgate up` and `make demo` need an admin key before anyone could have created
one. With --bootstrap-admin-key-file set and no key in the database, the service
creates tenant `admin` and an admin key for every model, and writes the key to that
file (mode 0600, replaced atomically). The key is written before the database commits
it, so a key that could not be written is never stored; once any key exists, nothing
happens, on this start or any later one.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import structlog

from services.auth.store import AuthStore

log = structlog.get_logger("tensorgate.auth")

ADMIN_TENANT = "admin"


def write_secret_file(path: Path, text: str) -> None:
    """`text` into `path` with mode 0600 from the first byte; readers see the old file or
    the whole new one (a temporary file in the same directory, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise


async def bootstrap_admin_key(store: AuthStore, path: Path) -> str | None:
    """The key id of the admin key written to `path`, or None when keys already existed."""
    created = await store.create_first_admin_key(
        ADMIN_TENANT, lambda key: write_secret_file(path, key + "\n")
    )
    if created is None:
        return None
    log.info("bootstrap admin key written", key_id=created.key_id, path=str(path))
    return created.key_id
