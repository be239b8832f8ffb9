"""The handshake of a client-streaming call (UploadVersion): send the first message,
wait to be accepted, then stream the rest.

A server that accepts the first message (an upload's header: the model exists, the
size is within the limit, the config parses) answers with response headers carrying
`ACCEPTED`. A server that refuses ends the call instead, with no such header. A client
that waits for this before streaming never writes into a call the server has already
ended, which grpc.aio reports as `INTERNAL: Internal error from Core` in place of the
server's status (grpc/grpc#36066); it also never sends a gigabyte nobody will keep.
Clients that do not wait (grpcurl, other languages) still work: the header is sent to
them like any other.
"""

from __future__ import annotations

from tensorgate.errors import metadata_value

ACCEPTED_KEY = "x-tensorgate-stream"
ACCEPTED_VALUE = "accepted"
ACCEPTED: tuple[tuple[str, str], ...] = ((ACCEPTED_KEY, ACCEPTED_VALUE),)


def is_accepted(initial_metadata: object) -> bool:
    """Whether a call's response headers say its first message was accepted."""
    return metadata_value(initial_metadata, ACCEPTED_KEY) == ACCEPTED_VALUE
