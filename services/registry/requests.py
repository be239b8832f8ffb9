"""What a caller may send the registry: bounds on every name, number and free-text field,
checked before anything is read or stored.

Every stored field travels again in the change feed, so an unbounded description or
label would make an event too large to send, and a feed that cannot send an event
stops every watcher behind it. The bounds here keep each event far below the message
limit; `Change.record` refuses anything that still gets too big.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from google.protobuf.timestamp_pb2 import Timestamp
from tensorgate.model_ref import InvalidModelRef, ModelRef
from tensorgate.registry.v1 import registry_pb2 as pb

from services.runtime.errors import InvalidArgument

MAX_DESCRIPTION = 4096
MAX_REASON = 1024
MAX_TASK = 64
MAX_LABELS = 64
MAX_LABEL_KEY = 128
MAX_LABEL_VALUE = 256
MAX_TRANSFORMATION = 128
MAX_LINEAGE_PARAMETERS = 64
MAX_LINEAGE_VALUE = 256
MAX_TENANT = 128
# C0 and C1 controls but tab, CR and LF, and the bidirectional overrides and isolates
# that make text show other than it reads.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
# Timestamps protobuf can turn into a datetime: years 1..9999.
_MIN_SECONDS, _MAX_SECONDS = -62135596800, 253402300799


def text(field: str, value: str, limit: int) -> None:
    """Free text: at most `limit` bytes, and no control character but tab, CR and LF
    (PostgreSQL cannot store NUL, and escape sequences would reach operators' terminals
    through the CLI)."""
    size = len(value.encode())
    if size > limit:
        raise InvalidArgument(field, f"is {size} bytes; at most {limit} are allowed")
    bad = _CONTROL.search(value)
    if bad is not None:
        raise InvalidArgument(
            field,
            f"holds the control character U+{ord(bad.group()):04X} at position {bad.start()}; "
            "only printable text, tabs and line ends are kept",
        )


def name(field: str, value: str) -> None:
    """Model and alias names follow the grammar of model references."""
    try:
        valid = ModelRef.parse(value) == ModelRef(value)
    except InvalidModelRef:
        valid = False
    if not valid:
        raise InvalidArgument(
            field,
            f"{value[:64]!r} is not a valid name: letters, digits, '_', '.' and '-', "
            "starting with a letter or digit, at most 128",
        )


def version_number(field: str, value: int) -> None:
    if value < 1:
        raise InvalidArgument(field, f"must be a version number (>= 1), got {value}")


def optional_name(field: str, value: str) -> None:
    """A name a list call may filter by; empty means no filter."""
    if value:
        name(field, value)


def labels(field: str, values: Mapping[str, str]) -> None:
    if len(values) > MAX_LABELS:
        raise InvalidArgument(field, f"{len(values)} labels; at most {MAX_LABELS} are allowed")
    for key, value in values.items():
        if not key:
            raise InvalidArgument(field, "a label's key must not be empty")
        text(f"{field}[{key[:32]!r}]", key, MAX_LABEL_KEY)
        text(f"{field}[{key[:32]!r}]", value, MAX_LABEL_VALUE)


def model(message: pb.Model, field: str = "model") -> None:
    name(f"{field}.name", message.name)
    if message.task:  # the store says it is required
        name(f"{field}.task", message.task)
        text(f"{field}.task", message.task, MAX_TASK)
    text(f"{field}.description", message.description, MAX_DESCRIPTION)
    text(f"{field}.owner_tenant", message.owner_tenant, MAX_TENANT)
    labels(f"{field}.labels", message.labels)


def lineage(message: pb.Lineage, field: str = "header.lineage") -> None:
    if message.parent_version < 0:
        raise InvalidArgument(f"{field}.parent_version", "must be a version number, or 0 for none")
    text(f"{field}.transformation", message.transformation, MAX_TRANSFORMATION)
    if len(message.parameters) > MAX_LINEAGE_PARAMETERS:
        raise InvalidArgument(
            f"{field}.parameters", f"at most {MAX_LINEAGE_PARAMETERS} parameters are allowed"
        )
    for key, value in message.parameters.items():
        text(f"{field}.parameters", key, MAX_LABEL_KEY)
        text(f"{field}.parameters", value, MAX_LINEAGE_VALUE)


def model_version(model_name: str, version: int) -> None:
    name("model", model_name)
    version_number("version", version)


def alias(model_name: str, alias_name: str, reason: str = "") -> None:
    name("model", model_name)
    name("alias", alias_name)
    text("reason", reason, MAX_REASON)


def timestamp(field: str, value: Timestamp) -> None:
    if not (_MIN_SECONDS <= value.seconds <= _MAX_SECONDS and 0 <= value.nanos < 1_000_000_000):
        raise InvalidArgument(field, "must be a time between the years 1 and 9999")
