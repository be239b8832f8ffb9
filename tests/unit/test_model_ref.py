"""Model references: "name", "name:3", "name@alias", and what is refused."""

from __future__ import annotations

import pytest
from tensorgate.model_ref import InvalidModelRef, ModelRef


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tinylm", ModelRef("tinylm")),
        ("tinylm:3", ModelRef("tinylm", version=3)),
        ("tinylm@production", ModelRef("tinylm", alias="production")),
        ("my-model.v2_x", ModelRef("my-model.v2_x")),
    ],
)
def test_parses(text: str, expected: ModelRef) -> None:
    assert ModelRef.parse(text) == expected
    assert str(ModelRef.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        ":1",
        "tinylm:",
        "tinylm:0",
        "tinylm:x",
        "tinylm@",
        "tinylm:1@prod",
        "bad name",
        "x" * 200,
    ],
)
def test_refuses_malformed(text: str) -> None:
    with pytest.raises(InvalidModelRef) as error:
        ModelRef.parse(text)
    assert str(error.value)
