"""Registry-mode worker settings: the registry decides what is loaded, and the worker
owns the model repository it writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.runtime.settings import load_settings
from services.worker.settings import WorkerSettings


def refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(WorkerSettings, argv, env={}, prog="worker")
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_static_mode_is_the_default(tmp_path: Path) -> None:
    settings = WorkerSettings(data_dir=tmp_path)
    assert settings.registry == ""
    assert settings.served_repository == settings.model_repository
    assert settings.retire_seconds == 5.0


def test_with_the_bundled_triton_the_repository_is_under_the_data_dir(tmp_path: Path) -> None:
    argv = ["--registry", "localhost:50070", "--data-dir", str(tmp_path), "--retire-seconds", "2s"]
    settings = load_settings(WorkerSettings, argv, env={})
    assert settings.served_repository == tmp_path / "model-repository"
    assert settings.artifact_cache == tmp_path / "artifacts"
    assert settings.retire_seconds == 2.0


def test_with_a_remote_triton_the_shared_repository_is_named(tmp_path: Path) -> None:
    argv = ["--registry", "r:1", "--triton-url", "t:8001", "--model-repository", str(tmp_path)]
    assert load_settings(WorkerSettings, argv, env={}).served_repository == tmp_path


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--registry", "r:1", "--models", "digits"], "--models and --registry: set one"),
        (["--registry", "r:1", "--triton-url", "t:1"], "needs --model-repository"),
        (["--registry", "r:1", "--model-repository", "/tmp"], "leave it unset"),
        (
            ["--registry", "r:1", "--triton-url", "t:1", "--model-repository", "/nonexistent"],
            "--model-repository: /nonexistent is not a directory",
        ),
        (["--registry", "nohostport"], "--registry: 'nohostport' is not host:port"),
        (["--retire-seconds", "-1"], "--retire-seconds: must be a finite duration >= 0"),
    ],
)
def test_registry_mode_mistakes_are_refused_naming_the_flags(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in refused(argv, capsys)
