"""Writes the API reference, docs/api.md, from the protos' own comments (`make api-docs`).

protoc (grpcio-tools', the one `make protos` uses) reads every .proto under protos/ into
a descriptor set with source info, that is with each element's comments; the reference
lists every service, RPC, message, field, enum and enum value with the comment above it
(or after it on its line). tests/unit/test_api_docs.py fails when docs/api.md differs
from what this script writes, or when a public element has no comment.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gen_protos import PROTOS, ROOT, proto_files, protoc
from google.protobuf import descriptor_pb2

OUT = ROOT / "docs" / "api.md"

# Field numbers in descriptor.proto, as source-info paths use them.
_MESSAGE, _ENUM, _SERVICE, _SYNTAX = 4, 5, 6, 12
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4
_VALUE, _METHOD = 2, 2

_TYPES = {
    value: name.removeprefix("TYPE_").lower()
    for name, value in descriptor_pb2.FieldDescriptorProto.Type.items()
}


def descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """Every proto under protos/, parsed by protoc with its comments."""
    files = [str(p.relative_to(PROTOS)) for p in proto_files()]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "protos.pb"
        protoc(f"--descriptor_set_out={out}", "--include_source_info", *files)
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


@dataclass(frozen=True)
class Element:
    """One documented element: what it is, its full name, and its comment ("" if none)."""

    kind: str
    name: str
    comment: str


def _comments(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    found = {}
    for location in proto.source_code_info.location:
        text = location.leading_comments.strip() or location.trailing_comments.strip()
        if text:
            found[tuple(location.path)] = "\n".join(line.strip() for line in text.splitlines())
    return found


def _one_line(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _type(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type_name:
        return f"`{field.type_name.lstrip('.')}`"
    return f"`{_TYPES[field.type]}`"


def _label(field: descriptor_pb2.FieldDescriptorProto, maps: set[str]) -> str:
    if field.type_name.lstrip(".") in maps:
        return "map"
    if field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED:
        return "repeated"
    if field.proto3_optional:
        return "optional"
    if field.HasField("oneof_index"):
        return "oneof"
    return ""


class _File:
    """One .proto's elements in the order the reference shows them."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self.proto = proto
        self.comments = _comments(proto)
        self.lines: list[str] = []
        self.elements: list[Element] = []

    def _note(self, kind: str, name: str, path: tuple[int, ...]) -> str:
        comment = self.comments.get(path, "")
        self.elements.append(Element(kind, name, comment))
        return comment

    def render(self) -> None:
        proto, package = self.proto, self.proto.package
        self.lines += [f"## `{package}`", "", f"Source: `protos/{proto.name}`", ""]
        intro = self.comments.get((_SYNTAX,), "")
        if intro:
            self.lines += [intro, ""]
        for s_index, service in enumerate(proto.service):
            path = (_SERVICE, s_index)
            name = f"{package}.{service.name}"
            comment = self._note("service", name, path)
            self.lines += [f"### service `{service.name}`", "", comment, ""]
            for m_index, method in enumerate(service.method):
                m_comment = self._note("rpc", f"{name}.{method.name}", (*path, _METHOD, m_index))
                request = ("stream " if method.client_streaming else "") + method.input_type[1:]
                response = ("stream " if method.server_streaming else "") + method.output_type[1:]
                self.lines += [
                    f"#### `{method.name}`",
                    "",
                    f"`rpc {method.name}({request}) returns ({response})`",
                    "",
                    m_comment,
                    "",
                ]
        for index, message in enumerate(proto.message_type):
            self._message(message, f"{package}.{message.name}", (_MESSAGE, index))
        for index, enum in enumerate(proto.enum_type):
            self._enum(enum, f"{package}.{enum.name}", (_ENUM, index))

    def _message(
        self, message: descriptor_pb2.DescriptorProto, name: str, path: tuple[int, ...]
    ) -> None:
        if message.options.map_entry:
            return  # a map field's entry: the field documents it
        comment = self._note("message", name, path)
        self.lines += [f"### message `{name.removeprefix(self.proto.package + '.')}`", ""]
        self.lines += [comment, ""]
        maps = {
            f"{name}.{nested.name}" for nested in message.nested_type if nested.options.map_entry
        }
        if message.field:
            self.lines += ["| field | type | label | description |", "|---|---|---|---|"]
            for f_index, field in enumerate(message.field):
                f_comment = self._note("field", f"{name}.{field.name}", (*path, _FIELD, f_index))
                type_text = _type(field)
                if field.type_name.lstrip(".") in maps:
                    entry = next(
                        n for n in message.nested_type if f"{name}.{n.name}" == field.type_name[1:]
                    )
                    type_text = f"{_type(entry.field[0])} -> {_type(entry.field[1])}"
                self.lines.append(
                    f"| `{field.name}` | {type_text} | {_label(field, maps)} | "
                    f"{_one_line(f_comment)} |"
                )
            self.lines.append("")
        else:
            self.lines += ["No fields.", ""]
        for n_index, nested in enumerate(message.nested_type):
            self._message(nested, f"{name}.{nested.name}", (*path, _NESTED, n_index))
        for e_index, enum in enumerate(message.enum_type):
            self._enum(enum, f"{name}.{enum.name}", (*path, _NESTED_ENUM, e_index))

    def _enum(
        self, enum: descriptor_pb2.EnumDescriptorProto, name: str, path: tuple[int, ...]
    ) -> None:
        comment = self._note("enum", name, path)
        self.lines += [f"### enum `{name.removeprefix(self.proto.package + '.')}`", ""]
        self.lines += [comment, "", "| value | number | description |", "|---|---|---|"]
        for v_index, value in enumerate(enum.value):
            v_comment = self._note("enum value", f"{name}.{value.name}", (*path, _VALUE, v_index))
            self.lines.append(f"| `{value.name}` | {value.number} | {_one_line(v_comment)} |")
        self.lines.append("")


def _files(descriptors: descriptor_pb2.FileDescriptorSet) -> Iterator[_File]:
    for proto in descriptors.file:
        if proto.name.startswith("tensorgate/"):
            rendered = _File(proto)
            rendered.render()
            yield rendered


def reference(descriptors: descriptor_pb2.FileDescriptorSet) -> tuple[str, list[Element]]:
    """The reference's Markdown, and every element it documents."""
    lines = [
        "# tensorgate API reference",
        "",
        "Generated from the comments in `protos/` by `make api-docs` (tools/gen_api_docs.py);",
        "do not edit by hand. Every call goes to the gateway with `authorization: Bearer <key>`.",
        "The gateway also serves KServe v2 `inference.GRPCInferenceService` (Triton's protocol);",
        "README.md says what of it is offered.",
        "",
    ]
    elements: list[Element] = []
    for rendered in _files(descriptors):
        lines += rendered.lines
        elements += rendered.elements
    text = "\n".join(lines)
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.rstrip("\n") + "\n", elements


def undocumented(elements: list[Element]) -> list[str]:
    return [f"{e.kind} {e.name}" for e in elements if not e.comment]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text, elements = reference(descriptor_set())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    missing = undocumented(elements)
    print(f"wrote {args.out} ({len(elements)} elements, {len(missing)} without a comment)")
    for name in missing:
        print(f"  no comment: {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
