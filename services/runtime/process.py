"""Child processes that do not outlive their parent."""

from __future__ import annotations

import shutil
import socket
from collections.abc import Sequence


def die_with_parent(argv: Sequence[str]) -> list[str]:
    """`argv` wrapped so that the kernel sends it SIGTERM if this process dies first.

    util-linux's setpriv sets PR_SET_PDEATHSIG and then execs the command, so no
    Python code runs in the forked child (a preexec_fn would, which is unsafe in a
    process that has gRPC's threads). Without setpriv the command runs unwrapped.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now (for children that need one on the command line)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port
