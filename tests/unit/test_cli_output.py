"""What the CLI prints of stored text: never an escape sequence the terminal would act
on, never rich markup, and one line per row for scripts."""

from __future__ import annotations

import pytest
from rich.console import Console

from launcher import output

HOSTILE = "ok\x1b]0;pwned\x07\x1b[2J [bold red]red[/] [/nope] \u202egnp.exe\ttab\nline"


def test_a_script_gets_one_escaped_line_per_row(capsys: pytest.CaptureFixture[str]) -> None:
    output.table(("NAME", "DESCRIPTION"), [("m", HOSTILE)])
    printed = capsys.readouterr().out
    assert printed.count("\n") == 1 and "\x1b" not in printed and "\u202e" not in printed
    assert printed.split("\t") == [
        "m",
        "ok\\x1b]0;pwned\\x07\\x1b[2J [bold red]red[/] [/nope] \\u202egnp.exe tab line\n",
    ]


def test_a_terminal_shows_control_characters_and_markup_as_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorded = Console(record=True, force_terminal=True, width=200)
    monkeypatch.setattr(output, "Console", lambda **_: recorded)
    output.table(("NAME", "DESCRIPTION"), [("m", HOSTILE)])
    output.result(HOSTILE, ("m",))
    shown = recorded.export_text()
    assert "\x1b" not in shown and "\u202e" not in shown and "\x07" not in shown
    assert shown.count("\\x1b]0;pwned\\x07\\x1b[2J [bold red]red[/] [/nope] \\u202egnp.exe") == 2
