"""ModelStatistics across workers: each worker's Triton counts only its own calls, so the
gateway adds up what every worker serving a model version says, as one server would.

Counts and durations add; `last_inference` (a time) is the latest; batch statistics add
per batch size, response statistics per response index. Fields added to Triton's
messages later add too, unless they are times (named `last_*`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from tritonclient.grpc import service_pb2

# Repeated messages matched by this field rather than by position.
_KEYED = {"batch_stats": "batch_size"}
# Identify the entry; never added up.
_IDENTITY = frozenset({"name", "version", "batch_size"})


def _add(into: Any, other: Any) -> None:
    """Adds `other`'s counts into `into` (messages of one type)."""
    for field, value in other.ListFields():
        name = field.name
        if name in _IDENTITY:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            target = getattr(into, name)
            for key, entry in value.items():
                _add(target[key], entry)
        elif field.label == FieldDescriptor.LABEL_REPEATED:
            if field.message_type is None:
                continue  # no repeated scalars in these messages to add meaningfully
            key = _KEYED.get(name)
            target = getattr(into, name)
            for entry in value:
                match = next(
                    (t for t in target if key and getattr(t, key) == getattr(entry, key)), None
                )
                if match is None:
                    target.add().CopyFrom(entry)
                else:
                    _add(match, entry)
        elif field.message_type is not None:
            _add(getattr(into, name), value)
        elif field.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
            current = getattr(into, name)
            setattr(
                into, name, max(current, value) if name.startswith("last_") else current + value
            )


def merged(
    answers: Iterable[service_pb2.ModelStatisticsResponse],
) -> service_pb2.ModelStatisticsResponse:
    """Every model version's statistics, added up over the workers' answers."""
    total = service_pb2.ModelStatisticsResponse()
    by_version: dict[tuple[str, str], Any] = {}
    for answer in answers:
        for stats in answer.model_stats:
            key = (stats.name, stats.version)
            entry = by_version.get(key)
            if entry is None:
                entry = by_version[key] = total.model_stats.add()
                entry.name, entry.version = key
            _add(entry, stats)
    return total
