"""Numbers the CLI sends to the auth service are bounded as the service bounds them: one
out of range is a usage error (exit 2) naming the flag, refused before anything is sent,
never an 'unexpected' failure to encode it."""

from __future__ import annotations

import pytest

from launcher.cli import main


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["keys", "create", "gamma", "--requests-per-minute", "9223372036854775808"], "--requests"),
        (["keys", "create", "gamma", "--tokens-per-day", "1000000000000001"], "--tokens-per-day"),
        (
            ["quotas", "set", "--tenant", "gamma", "--concurrent-streams", "1000000000000001"],
            "--concurrent",
        ),
        (["quotas", "set", "--tenant", "gamma", "--monthly-spend-cap", "1e30"], "--monthly"),
        (["prices", "set", "tinylm", "--compute-per-second", "inf"], "--compute-per-second"),
        (["quotas", "set", "--tenant", "gamma", "--monthly-spend-cap", "nan"], "0..1e+09"),
        (["prices", "set", "tinylm", "--prompt-per-1k", "-1"], "--prompt-per-1k"),
        (["keys", "rotate", "abcdefghijkl", "--grace", "1e30"], "--grace"),
        (["keys", "rotate", "abcdefghijkl", "--grace", "31622401s"], "--grace"),
        (["keys", "rotate", "abcdefghijkl", "--grace", "8785h"], "--grace"),
    ],
)
def test_an_out_of_range_number_is_a_usage_error(
    args: list[str], said: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens there: the refusal must come before any call.
    monkeypatch.setenv("TENSORGATE_ADDRESS", "127.0.0.1:1")
    monkeypatch.setenv("TENSORGATE_API_KEY", "not-needed")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert said in err and "unexpected" not in err
