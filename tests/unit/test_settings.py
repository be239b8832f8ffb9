"""Settings come from flags and environment, and invalid values stop the start."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.settings import GatewaySettings
from services.runtime.settings import load_settings
from services.worker.settings import WorkerSettings


def test_flags_beat_environment_which_beats_defaults() -> None:
    env = {"TENSORGATE_GATEWAY_PORT": "7000", "TENSORGATE_GATEWAY_WORKERS": "a:1,b:2"}
    settings = load_settings(GatewaySettings, ["--port", "7001"], env=env)
    assert settings.port == 7001
    assert settings.workers == ("a:1", "b:2")
    assert settings.refresh_seconds == 5.0


def test_worker_models_and_paths_parse(tmp_path: Path) -> None:
    settings = load_settings(
        WorkerSettings,
        ["--models", "tinylm", "--model-repository", str(tmp_path), "--triton-url", ""],
        env={},
    )
    assert settings.models == ("tinylm",)
    assert settings.model_repository == tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "a:1", "--port", "70000"], "port must be 0..65535"),
        (["--workers", "a:1", "--port", "abc"], "--port: expected int, got 'abc'"),
        ([], "workers: at least one worker address"),
        (["--workers", "nohostport"], "'nohostport' is not host:port"),
        (["--workers", "a:1", "--log-format", "xml"], "log_format must be auto, console or json"),
    ],
)
def test_invalid_values_are_refused_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(GatewaySettings, argv, env={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_worker_refuses_missing_repository(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        load_settings(WorkerSettings, ["--model-repository", "/nonexistent/repo"], env={})
    assert "/nonexistent/repo is not a directory" in capsys.readouterr().err
