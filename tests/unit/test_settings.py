"""Settings come from flags, then environment, then defaults; an invalid value stops the
start with one exit-2 message naming the setting; secrets never show."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import structlog
from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import SettingsConfigDict

from gateway.settings import GatewaySettings
from services.runtime import main
from services.runtime.settings import ServiceSettings, SettingsError, load_settings, parse_duration
from services.worker.settings import WorkerSettings

GATEWAY = ["--workers", "a:1", "--allow-anonymous"]


class AuthLikeSettings(ServiceSettings):
    """A service with secrets, as the auth service will have."""

    model_config = SettingsConfigDict(env_prefix="TENSORGATE_AUTHLIKE_")

    database_password: SecretStr = Field(
        SecretStr("default-hunter2"), min_length=8, description="database password"
    )
    signing_key: SecretStr | None = Field(None, description="key that signs tokens")


def refused(
    cls: type[ServiceSettings],
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str] | None = None,
) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(cls, argv, env=env or {}, prog="svc")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("svc: error: ") and err.count("\n") == 1  # one line
    return err


def test_flags_beat_environment_which_beats_defaults() -> None:
    env = {
        "TENSORGATE_GATEWAY_PORT": "7000",
        "TENSORGATE_GATEWAY_WORKERS": "a:1,b:2",
        "TENSORGATE_GATEWAY_AUTH": "auth:50053",
    }
    settings = load_settings(GatewaySettings, ["--port", "7001"], env=env)
    assert settings.port == 7001
    assert settings.workers == ("a:1", "b:2")
    assert settings.refresh_seconds == 5.0
    assert settings.metrics_port == 9400  # the gateway's own default beats the base's


def test_a_gateway_needs_auth_or_an_explicit_anonymous_mode(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        load_settings(GatewaySettings, ["--workers", "a:1"], env={}, prog="svc")
    assert "--allow-anonymous" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_settings(
            GatewaySettings,
            ["--workers", "a:1", "--auth", "a:2", "--allow-anonymous"],
            env={},
            prog="svc",
        )
    assert load_settings(GatewaySettings, ["--workers", "a:1", "--auth", "a:2"], env={}).auth


def test_env_names_are_case_insensitive_and_other_services_are_ignored() -> None:
    env = {
        "tensorgate_gateway_workers": "a:1",
        "tensorgate_gateway_allow_anonymous": "true",
        "TENSORGATE_WORKER_PORT": "9",
    }
    settings = load_settings(GatewaySettings, [], env=env)
    assert settings.workers == ("a:1",) and settings.port == 0


def test_construction_and_an_explicit_env_never_read_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TENSORGATE_GATEWAY_PORT", "7000")
    monkeypatch.setenv("TENSORGATE_GATEWAY_WORKERS", "z:9")
    monkeypatch.setenv("TENSORGATE_GATEWAY_ALLOW_ANONYMOUS", "true")
    assert GatewaySettings(allow_anonymous=True, workers=("a:1",)).port == 0
    assert load_settings(GatewaySettings, GATEWAY, env={}).port == 0
    assert load_settings(GatewaySettings, []).port == 7000  # env=None: os.environ


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"argv": ["--workers", "a:1,b:2"]}, ("a:1", "b:2")),
        ({"env": {"TENSORGATE_GATEWAY_WORKERS": " a:1 , [::1]:50051 ,"}}, ("a:1", "[::1]:50051")),
        ({"argv": ["--workers", "host.example:50051"]}, ("host.example:50051",)),
    ],
)
def test_lists_are_comma_separated_in_flags_and_environment(
    source: dict[str, object], expected: tuple[str, ...]
) -> None:
    settings = load_settings(
        GatewaySettings,
        [*source.get("argv", []), "--allow-anonymous"],  # type: ignore[misc]
        env=source.get("env", {}),  # type: ignore[arg-type]
    )
    assert settings.workers == expected


def test_worker_models_and_paths_parse(tmp_path: Path) -> None:
    argv = ["--models", "tinylm", "--model-repository", str(tmp_path), "--triton-url", ""]
    settings = load_settings(WorkerSettings, argv, env={"TENSORGATE_WORKER_MODELS": "x,y"})
    assert settings.models == ("tinylm",)
    assert settings.model_repository == tmp_path
    assert settings.triton_url == ""


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2.5", 2.5), ("500ms", 0.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("0", 0.0)],
)
def test_durations_take_seconds_or_units(text: str, seconds: float) -> None:
    settings = load_settings(GatewaySettings, [*GATEWAY, "--eject-seconds", text], env={})
    assert settings.eject_seconds == seconds
    assert isinstance(settings.eject_seconds, float)


@pytest.mark.parametrize("value", ["-1", "-5ms", "inf", "nan", "1d", "", "s", True, math.nan])
def test_durations_refuse_negative_non_finite_and_unknown_units(value: object) -> None:
    with pytest.raises(SettingsError):
        parse_duration(value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "--port: must be 0..65535 (0 picks a free one), got 70000"),
        (["--port", "abc"], "--port: must be an integer, got 'abc'"),
        (["--metrics-port", "-2"], "--metrics-port: must be -1..65535"),
        (["--host", "::"], "--host: '::': write an IPv6 address in brackets"),
        (["--host", "bad host"], "--host: 'bad host' is not a host name or address"),
        (["--log-level", "loud"], "--log-level: must be 'debug', 'info', 'warning' or 'error'"),
        (["--log-format", "xml"], "--log-format: must be 'auto', 'console' or 'json', got 'xml'"),
        (["--drain-seconds", "-1"], "--drain-seconds: must be a finite duration >= 0, got '-1'"),
        (["--grace-seconds", "inf"], "--grace-seconds: must be a finite duration >= 0"),
        (["--grace-seconds", "5x"], "--grace-seconds: must be seconds (2.5) or a duration"),
        (["--refresh-seconds", "0ms"], "--refresh-seconds: must be between 0.1s and 3600s, got 0s"),
        (["--upstream-timeout", "0"], "--upstream-timeout: must be > 0"),
        (["--workers", ""], "--workers: at least one worker address is needed"),
        (["--workers", "nohostport"], "--workers: 'nohostport' is not host:port"),
        (["--workers", "a:1,b:0"], "--workers: 'b:0' is not host:port (port 1..65535"),
        (["--workers", "::1:50051"], "--workers: '::1': write an IPv6 address in brackets"),
        (["--workers", "[zz]:1"], "--workers: '[zz]' is not an IPv6 address in brackets"),
    ],
)
def test_invalid_gateway_values_are_refused_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in refused(GatewaySettings, [*GATEWAY, *argv], capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--triton-url", "localhost"], "--triton-url: 'localhost' is not host:port"),
        (["--triton-threads", "-1"], "--triton-threads: must be >= 0, got '-1'"),
        (["--models", "tinylm,bad name"], "--models: 'bad name' is not a valid model name"),
        (["--triton-start-timeout", "0"], "--triton-start-timeout: must be > 0"),
    ],
)
def test_invalid_worker_values_are_refused_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert message in refused(WorkerSettings, argv, capsys)


def test_a_bad_environment_value_names_the_flag_and_the_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = refused(GatewaySettings, GATEWAY, capsys, env={"TENSORGATE_GATEWAY_PORT": "-5"})
    assert "--port (from TENSORGATE_GATEWAY_PORT): must be 0..65535" in err


def test_every_bad_value_is_named_in_the_one_message(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(GatewaySettings, ["--port", "x", "--eject-seconds", "-1"], capsys)
    assert "--port: must be an integer" in err
    assert "--eject-seconds: must be a finite duration" in err
    assert "--workers: at least one" in err


def test_direct_construction_validates_too() -> None:
    with pytest.raises(ValidationError, match=r"must be 0\.\.65535"):
        GatewaySettings(allow_anonymous=True, workers=("a:1",), port=70000)
    with pytest.raises(ValidationError, match="Extra inputs"):
        GatewaySettings(allow_anonymous=True, workers=("a:1",), prot=1)  # type: ignore[call-arg]


def test_worker_refuses_a_missing_repository_unless_triton_is_remote(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = refused(WorkerSettings, ["--model-repository", "/nonexistent/repo"], capsys)
    assert "--model-repository: /nonexistent/repo is not a directory" in err
    remote = ["--model-repository", "/nonexistent/repo", "--triton-url", "[::1]:8001"]
    assert load_settings(WorkerSettings, remote, env={}).triton_url == "[::1]:8001"


def _pem_files(tmp_path: Path, *names: str) -> list[Path]:
    paths = [tmp_path / f"{name}.pem" for name in names]
    for path in paths:
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
    return paths


def test_tls_files_are_read_from_flags_and_environment(tmp_path: Path) -> None:
    cert, key, client_ca, ca, up_cert, up_key = _pem_files(
        tmp_path, "cert", "key", "client-ca", "ca", "up-cert", "up-key"
    )
    argv = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    argv += ["--tls-client-ca-file", str(client_ca), "--upstream-ca-file", str(ca)]
    env = {
        "TENSORGATE_GATEWAY_UPSTREAM_CERT_FILE": str(up_cert),
        "TENSORGATE_GATEWAY_UPSTREAM_KEY_FILE": str(up_key),
    }
    settings = load_settings(GatewaySettings, [*GATEWAY, *argv], env=env)
    assert (settings.tls_cert_file, settings.tls_key_file) == (cert, key)
    assert (settings.tls_client_ca_file, settings.upstream_ca_file) == (client_ca, ca)
    assert (settings.upstream_cert_file, settings.upstream_key_file) == (up_cert, up_key)
    plain = load_settings(GatewaySettings, GATEWAY, env={"TENSORGATE_GATEWAY_TLS_CERT_FILE": ""})
    assert plain.tls_cert_file is None and plain.upstream_ca_file is None


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"--tls-cert-file": "missing", "--tls-key-file": "key"}, "missing.pem is not a file"),
        ({"--tls-cert-file": "dir", "--tls-key-file": "key"}, "--tls-cert-file: "),
        ({"--tls-cert-file": "cert"}, "--tls-cert-file and --tls-key-file: set both or neither"),
        ({"--tls-client-ca-file": "ca"}, "--tls-client-ca-file needs --tls-cert-file"),
        ({"--upstream-key-file": "key"}, "--upstream-cert-file and --upstream-key-file: set both"),
        (
            {"--upstream-cert-file": "cert", "--upstream-key-file": "key"},
            "--upstream-cert-file needs --upstream-ca-file",
        ),
        ({"--upstream-ca-file": "missing"}, "--upstream-ca-file: "),
    ],
)
def test_tls_files_must_exist_and_come_in_pairs(
    files: dict[str, str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _pem_files(tmp_path, "cert", "key", "ca")
    (tmp_path / "dir.pem").mkdir()
    argv = [part for flag, name in files.items() for part in (flag, str(tmp_path / f"{name}.pem"))]
    assert message in refused(GatewaySettings, [*GATEWAY, *argv], capsys)


def test_help_lists_every_flag_with_its_env_var_and_hides_secret_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(AuthLikeSettings, ["--help"], env={})
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in AuthLikeSettings.model_fields:
        assert "--" + name.replace("_", "-") in out
        assert "TENSORGATE_AUTHLIKE_" + name.upper() in out
    assert "database password" in out and "default 127.0.0.1" in out
    assert "hunter2" not in out and "**" not in out


def test_secrets_are_masked_in_repr_str_and_loggable() -> None:
    settings = load_settings(
        AuthLikeSettings,
        ["--signing-key", "sk-flag-secret"],
        env={"TENSORGATE_AUTHLIKE_DATABASE_PASSWORD": "env-secret-pw"},
    )
    assert settings.signing_key is not None
    assert settings.signing_key.get_secret_value() == "sk-flag-secret"
    assert settings.database_password.get_secret_value() == "env-secret-pw"
    loggable = settings.loggable()
    for shown in (repr(settings), str(settings), repr(loggable)):
        assert "secret" not in shown
    assert loggable["signing_key"] == loggable["database_password"] == "**********"
    assert loggable["port"] == 0 and loggable["tls_cert_file"] is None


def test_a_refused_secret_is_not_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(AuthLikeSettings, ["--database-password", "short"], capsys)
    assert "--database-password: " in err and "short" not in err


def test_loggable_is_json_ready(tmp_path: Path) -> None:
    settings = WorkerSettings(model_repository=tmp_path, models=("a", "b"))
    loggable = settings.loggable()
    assert loggable["model_repository"] == str(tmp_path)
    assert loggable["models"] == ["a", "b"]


def test_the_starting_line_carries_the_settings_with_secrets_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def start(settings: AuthLikeSettings) -> main.RunningService:
        raise OSError("no socket in a unit test")

    monkeypatch.setattr(main, "configure_logging", lambda **_: None)
    monkeypatch.setenv("TENSORGATE_AUTHLIKE_SIGNING_KEY", "sk-env-secret")
    with structlog.testing.capture_logs() as logs:
        code = main.run_service(AuthLikeSettings, start, ["--port", "5"], prog="authlike")
    assert code == 1
    starting = next(line for line in logs if line["event"] == "starting")
    assert starting["service"] == "authlike"
    assert starting["settings"]["port"] == 5
    assert starting["settings"]["signing_key"] == "**********"
    assert "sk-env-secret" not in repr(logs)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--stream-linger-seconds", "1h"], "--stream-linger-seconds: must be between 0s and 0.1s"),
        (["--log-flush-seconds", "10s"], "--log-flush-seconds: must be between 0s and 5s"),
    ],
)
def test_durations_a_worker_cannot_run_with_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        load_settings(WorkerSettings, argv, env={})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_tls_file_that_is_not_pem_is_refused_naming_the_setting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    garbage = tmp_path / "cert.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(SystemExit):
        load_settings(
            GatewaySettings,
            ["--workers", "a:1", "--upstream-ca-file", str(garbage)],
            env={},
        )
    assert "--upstream-ca-file: " in capsys.readouterr().err


def test_routing_limits_take_flags_and_refuse_what_would_queue_without_bound(
    capsys: pytest.CaptureFixture[str],
) -> None:
    flags = ["--max-outstanding-per-worker", "4", "--queue-size", "0", "--queue-seconds", "250ms"]
    flags += ["--eject-max-seconds", "2m", "--eject-after-failures", "3"]
    settings = load_settings(GatewaySettings, [*GATEWAY, *flags], env={})
    assert settings.max_outstanding_per_worker == 4
    assert settings.queue_size == 0 and settings.queue_seconds == 0.25
    assert settings.eject_max_seconds == 120.0 and settings.eject_after_failures == 3
    bad = ["--max-outstanding-per-worker", "0", "--queue-size", "-1", "--queue-seconds", "1h"]
    err = refused(GatewaySettings, [*GATEWAY, *bad, "--eject-after-failures", "0"], capsys)
    assert "--max-outstanding-per-worker: must be 1..100000" in err
    assert "--queue-size: must be 0..1000000" in err
    assert "--queue-seconds" in err
    assert "--eject-after-failures: must be 1..1000" in err
