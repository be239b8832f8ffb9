"""Model references: "name", "name:3", "name@alias", and what is refused."""

from __future__ import annotations

import pytest
from tensorgate.model_ref import InvalidModelRef, ModelRef

from services.runtime.api_keys import new_key


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


# A key pasted into the model field, in each way the grammar refuses it.
@pytest.mark.parametrize(
    "template",
    ["!{key}", "tinylm:{key}", "tinylm {key}", "tinylm\x00{key}", "tinylm@{key}!", "{key}@x:1"],
)
def test_a_refused_ref_never_quotes_a_key(template: str) -> None:
    _, key = new_key()
    secret = key.split("_")[2]
    with pytest.raises(InvalidModelRef) as error:
        ModelRef.parse(template.format(key=key))
    assert "<redacted>" in str(error.value)
    assert secret[:8] not in str(error.value)
