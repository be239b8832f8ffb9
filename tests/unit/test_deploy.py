"""deploy/ validated offline: YAML lint, every Kustomize overlay rendered (tests/kustomize.py)
and checked against the Kubernetes schemas (kubernetes-validate, strict), the Compose file
against the compose-spec schema (check-jsonschema's vendored copy), and each service's
environment as its settings class reads it (a misspelt variable would be ignored at run
time, so it fails here). No cluster and no Docker engine run here: what needs one
(pulling images, scheduling, a real Consul) is not checked."""

from __future__ import annotations

import base64
import copy
import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from yamllint import config as yamllint_config
from yamllint import linter

from gateway.settings import GatewaySettings
from services.auth.settings import AuthSettings
from services.registry.settings import RegistrySettings
from services.runtime.settings import ServiceSettings, load_settings, parse_duration
from services.worker.settings import WorkerSettings
from tests.kustomize import render

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted((DEPLOY / "kubernetes" / "overlays").iterdir())
# The oldest Kubernetes the manifests are for: native sidecars (an init container with
# restartPolicy Always) are on by default from 1.29.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
SETTINGS: dict[str, type[ServiceSettings]] = {
    "gateway": GatewaySettings,
    "services.worker": WorkerSettings,
    "services.registry": RegistrySettings,
    "services.auth": AuthSettings,
}
SERVICES = ("gateway", "registry", "auth", "worker")
Resource = dict[str, Any]
# Stand-ins for the Secrets prod expects to find (deploy/README.md, "Secrets").
OUT_OF_BAND = {
    "tensorgate-database": "postgresql://tensorgate:pw@10.9.9.8:5432/tensorgate",
    "tensorgate-redis": "redis://10.9.9.9:6379/0",
}


@pytest.fixture(scope="module", params=[o.name for o in OVERLAYS])
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[Resource]]:
    name = str(request.param)
    return name, render(DEPLOY / "kubernetes" / "overlays" / name)


def _of_kind(resources: list[Resource], kind: str) -> dict[str, Resource]:
    return {r["metadata"]["name"]: r for r in resources if r["kind"] == kind}


def _service_container(deployment: Resource) -> Resource:
    containers: list[Resource] = deployment["spec"]["template"]["spec"]["containers"]
    return containers[0]


def _module(container: Resource) -> str:
    """The Python module a container runs (`python -m X`, or inside `sh -c`)."""
    found = re.search(
        r"python -m ([\w.]+)", " ".join(container["command"] + container.get("args", []))
    )
    assert found, f"{container['name']} runs no `python -m` service"
    return found.group(1)


def test_yaml_lint() -> None:
    conf = yamllint_config.YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) > 10
    problems = [
        f"{path.relative_to(REPO)}:{p.line}: {p.desc}"
        for path in files
        for p in linter.run(path.read_text(), conf, str(path))
    ]
    assert problems == []


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_validates_against_the_kubernetes_schemas(
    overlay: tuple[str, list[Resource]], version: str
) -> None:
    _, resources = overlay
    kinds = {r["kind"] for r in resources}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    assert "HorizontalPodAutoscaler" in kinds
    for resource in resources:
        kubernetes_validate.validate(resource, version, strict=True)


def test_the_validation_catches_a_wrong_manifest(overlay: tuple[str, list[Resource]]) -> None:
    gateway = copy.deepcopy(_of_kind(overlay[1], "Deployment")["tensorgate-gateway"])
    kubernetes_validate.validate(gateway, kubernetes_validate.latest_version(), strict=True)
    gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"  # a number
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, kubernetes_validate.latest_version(), strict=True)


def test_every_service_is_a_probed_bounded_deployment_that_drains(
    overlay: tuple[str, list[Resource]],
) -> None:
    name, resources = overlay
    deployments = _of_kind(resources, "Deployment")
    config = _of_kind(resources, "ConfigMap")["tensorgate-config"]["data"]
    drain = parse_duration(config["drain-seconds"]) + parse_duration(config["grace-seconds"])
    budgets = _of_kind(resources, "PodDisruptionBudget")
    for service in SERVICES:
        deployment = deployments[f"tensorgate-{service}"]
        pod = deployment["spec"]["template"]["spec"]
        # SIGTERM -> NOT_SERVING for drain-seconds -> grace-seconds for calls in flight:
        # the kubelet must not SIGKILL before that is over.
        assert pod["terminationGracePeriodSeconds"] > drain, (name, service)
        assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
        container = _service_container(deployment)
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
        for probe in ("readinessProbe", "livenessProbe"):
            spec = container[probe]
            if "grpc" in spec:
                assert spec["grpc"]["port"] == port
            else:  # TLS: grpc_health_probe calls the same health service
                assert spec["exec"]["command"][:3] == [
                    "grpc_health_probe",
                    f"-addr=127.0.0.1:{port}",
                    "-tls",
                ]
        for each in pod["containers"] + pod.get("initContainers", []):
            assert each["resources"]["requests"] and each["resources"]["limits"], each["name"]
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert budgets[f"tensorgate-{service}"]["spec"]["selector"]["matchLabels"] == labels
    gateway = deployments["tensorgate-gateway"]["spec"]["strategy"]["rollingUpdate"]
    assert gateway["maxUnavailable"] == 0
    hpa = _of_kind(resources, "HorizontalPodAutoscaler")["tensorgate-gateway"]["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "tensorgate-gateway",
    }
    # The HPA owns the count: a `replicas` in the manifest would be applied over it,
    # scaling the gateways back to that number on every `kubectl apply`.
    assert "replicas" not in deployments["tensorgate-gateway"]["spec"], name


def test_the_worker_pod_pairs_the_worker_with_triton(overlay: tuple[str, list[Resource]]) -> None:
    name, resources = overlay
    pod = _of_kind(resources, "Deployment")["tensorgate-worker"]["spec"]["template"]["spec"]
    (triton,) = pod["initContainers"]
    assert triton["restartPolicy"] == "Always"  # a sidecar: stopped after the worker
    assert triton["image"].split("/")[-1].startswith("tensorgate-triton:")
    env = {
        e["name"]: e.get("value")
        for e in _service_container({"spec": {"template": {"spec": pod}}})["env"]
    }
    grpc_port = next(p["containerPort"] for p in triton["ports"] if p["name"] == "triton-grpc")
    assert env["TENSORGATE_WORKER_TRITON_URL"] == f"127.0.0.1:{grpc_port}"
    shared = {m["mountPath"] for m in triton["volumeMounts"]}
    assert env["TENSORGATE_WORKER_MODEL_REPOSITORY"] in shared
    gpus = triton["resources"]["limits"].get("nvidia.com/gpu")
    assert gpus == (None if name == "dev" else 1)


def test_secrets_are_referenced_and_never_inlined(overlay: tuple[str, list[Resource]]) -> None:
    name, resources = overlay
    secrets = _of_kind(resources, "Secret")
    config_maps = _of_kind(resources, "ConfigMap")
    referenced: set[str] = set()
    for deployment in _of_kind(resources, "Deployment").values():
        if not deployment["metadata"]["name"].startswith("tensorgate-"):
            continue
        pod = deployment["spec"]["template"]["spec"]
        for variable in _service_container(deployment)["env"]:
            source = variable.get("valueFrom", {})
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                assert ref["key"] in config_maps[ref["name"]]["data"], ref
            if "secretKeyRef" in source:
                referenced.add(source["secretKeyRef"]["name"])
            if re.search(r"URL|TOKEN|KEY$", variable["name"]) and "value" in variable:
                # a URL with a password, a token or a key never sits in a manifest
                assert variable["name"].endswith(("_FILE", "TRITON_URL")), variable
        referenced |= {v["secret"]["secretName"] for v in pod.get("volumes", []) if "secret" in v}
    assert {"tensorgate-database", "tensorgate-redis", "tensorgate-consul"} <= referenced
    if name == "prod":
        # made out of band (deploy/README.md lists them), never in the repository
        assert secrets == {}
        assert {"tensorgate-internal-tls", "tensorgate-gateway-tls"} <= referenced
    else:
        assert {"tensorgate-database", "tensorgate-redis"} <= secrets.keys()


def test_prod_has_tls_on_the_gateway_and_mutual_tls_between_services() -> None:
    resources = render(DEPLOY / "kubernetes" / "overlays" / "prod")
    deployments = _of_kind(resources, "Deployment")
    for service in SERVICES:
        env = {e["name"] for e in _service_container(deployments[f"tensorgate-{service}"])["env"]}
        prefix = f"TENSORGATE_{service.upper()}_"
        assert {prefix + "TLS_CERT_FILE", prefix + "TLS_KEY_FILE"} <= env
        # every service but the public gateway asks callers for a certificate
        assert (prefix + "TLS_CLIENT_CA_FILE" in env) == (service != "gateway")
        # the registry calls a worker for the latency of an optimization job
        calls_others = service in ("gateway", "worker", "registry")
        upstream = {prefix + f"UPSTREAM_{f}_FILE" for f in ("CA", "CERT", "KEY")}
        assert (upstream <= env) == calls_others


def _environment(container: Resource, resources: list[Resource], files: Path) -> dict[str, str]:
    """The environment Kubernetes gives `container`, with fieldRefs of a made-up pod, and
    paths under /etc/tensorgate and /models made real under `files`."""
    config_maps = _of_kind(resources, "ConfigMap")
    secrets = {
        name: {k: base64.b64decode(v).decode() for k, v in s["data"].items()}
        for name, s in _of_kind(resources, "Secret").items()
    }
    fields = {"status.podIP": "10.1.2.3", "metadata.namespace": "tensorgate"}
    env: dict[str, str] = {}
    for variable in container["env"]:
        source = variable.get("valueFrom")
        if source is None:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], variable["value"])
        elif "fieldRef" in source:
            value = fields[source["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = config_maps[ref["name"]]["data"][ref["key"]]
        else:
            ref = source["secretKeyRef"]
            if ref["name"] in secrets:
                value = secrets[ref["name"]][ref["key"]]
            elif ref.get("optional"):
                continue  # Kubernetes leaves the variable out
            else:  # made out of band (prod): a stand-in of the same shape
                value = OUT_OF_BAND[ref["name"]]
        if value.startswith(("/etc/tensorgate/", "/models")):
            path = files / value.lstrip("/")
            if value.startswith("/models"):
                path.mkdir(parents=True, exist_ok=True)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("-----BEGIN STAND-IN-----\n")
            value = str(path)
        env[variable["name"]] = value
    return env


def _shell_exports(container: Resource, env: dict[str, str]) -> dict[str, str]:
    """What a `sh -c` command exports before it execs the service, run by a real sh."""
    if container["command"][:2] != ["/bin/sh", "-c"]:
        return {}
    script = container["args"][0].replace("$$(", "$(").split("&& exec")[0]
    printed = subprocess.run(
        ["/bin/sh", "-c", f"{script} && env"], env=env, capture_output=True, text=True, check=True
    ).stdout
    return dict(
        line.split("=", 1) for line in printed.splitlines() if line.startswith("TENSORGATE_")
    )


def test_each_service_starts_with_the_environment_it_is_given(
    overlay: tuple[str, list[Resource]], tmp_path: Path
) -> None:
    """Every TENSORGATE_* variable is a setting of that service, and together they
    pass the service's own validation (flags agree, addresses parse, files exist)."""
    _, resources = overlay
    for service in SERVICES:
        deployment = _of_kind(resources, "Deployment")[f"tensorgate-{service}"]
        container = _service_container(deployment)
        _check_paths_are_mounted(deployment["spec"]["template"]["spec"], container)
        module = _module(container)
        env = _environment(container, resources, tmp_path)
        env |= _shell_exports(container, env)
        _check_settings(SETTINGS[module], env)


def _check_paths_are_mounted(pod: Resource, container: Resource) -> None:
    """Every path the container's environment names (certificates, keys, the model
    repository, data directories) lies on one of its volume mounts, and every mount on
    one of the pod's volumes: `_environment` makes those paths real here, so without
    this a forgotten mount would pass and the service would find no file at start."""
    volumes = {v["name"] for v in pod.get("volumes", [])}
    mounts = []
    for mount in container.get("volumeMounts", []):
        assert mount["name"] in volumes, (container["name"], mount)
        mounts.append(mount["mountPath"].rstrip("/") + "/")
    for variable in container["env"]:
        path = variable.get("value", "")
        if path.startswith("/"):
            inside = path.rstrip("/") + "/"
            assert any(inside.startswith(m) for m in mounts), (container["name"], variable)


def _check_settings(cls: type[ServiceSettings], env: dict[str, str]) -> ServiceSettings:
    prefix = str(cls.model_config["env_prefix"])
    fields = {f"{prefix}{name}".upper() for name in cls.model_fields}
    ours = {k for k in env if k.startswith("TENSORGATE_")}
    assert ours - fields == set(), f"{cls.__name__}: not settings: {sorted(ours - fields)}"
    settings = load_settings(cls, [], env=env)
    assert settings.port > 0 and settings.consul and settings.advertise_address
    return settings


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def test_compose_file_validates_against_the_compose_spec() -> None:
    checked = subprocess.run(
        [
            str(Path(sys.executable).with_name("check-jsonschema")),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "compose.yaml"),
        ],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    services = _compose()["services"]
    assert {"postgres", "redis", "consul", "gateway", "worker", "registry", "auth"} <= set(services)


def test_compose_services_start_with_their_environment(tmp_path: Path) -> None:
    services = _compose()["services"]
    for name in SERVICES:
        service = services[name]
        env = {
            k: str(v).replace("${POSTGRES_PASSWORD}", "pw")
            for k, v in service["environment"].items()
        }
        cls = SETTINGS[service["command"][-1]]
        settings = _check_settings(cls, env)
        # the stop grace covers the drain the service does (defaults here)
        grace = parse_duration(service["stop_grace_period"])
        assert grace > settings.drain_seconds + settings.grace_seconds, name


def test_dockerfiles_lint_clean_and_copy_every_package() -> None:
    dockerfiles = [DEPLOY / "Dockerfile", DEPLOY / "triton" / "Dockerfile"]
    linted = subprocess.run(
        [str(Path(sys.executable).with_name("hadolint")), "--no-color", *map(str, dockerfiles)],
        capture_output=True,
        text=True,
    )
    assert linted.returncode == 0, linted.stdout + linted.stderr
    # The image installs the platform from what it copies: every package pyproject
    # installs, the SDK, the demo models the compose file registers, and every data
    # directory a setting's default points into the checkout for (the registry's
    # evaluation sets, the worker's model repository).
    copied = re.findall(r"^COPY (\S+)", (DEPLOY / "Dockerfile").read_text(), re.MULTILINE)
    for needed in ("sdk/", "services/", "gateway/", "launcher/", "models/repository/"):
        assert needed in copied, needed
    for default in (
        RegistrySettings.model_fields["evaluation_dir"].default,
        WorkerSettings.model_fields["model_repository"].default,
    ):
        inside = f"{Path(default).relative_to(REPO)}/"
        assert any(inside.startswith(path) for path in copied), inside
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert all(f"!{path}" in ignore for path in copied if path != "--from=probe"), copied


def _modules_run() -> Iterator[str]:
    for overlay_dir in OVERLAYS:
        for deployment in _of_kind(render(overlay_dir), "Deployment").values():
            if deployment["metadata"]["name"].startswith("tensorgate-"):
                yield _module(_service_container(deployment))


def test_every_command_names_a_runnable_service() -> None:
    for module in set(_modules_run()):
        assert module in SETTINGS
        # `python -m` runs the package's __main__, which hands the settings class to main
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module


def test_the_renderer_merges_as_strategic_merge_patches_do(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base", tmp_path / "overlay"
    base.mkdir()
    overlay.mkdir()
    (base / "kustomization.yaml").write_text("resources: [app.yaml]\n")
    (base / "app.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n"
        "  template:\n    spec:\n      containers:\n"
        "        - {name: a, image: 'img:1', env: [{name: X, value: '1'}, {name: Y, value: '2'}],"
        " readinessProbe: {grpc: {port: 1}}}\n"
        "        - {name: b, image: other}\n"
    )
    (overlay / "kustomization.yaml").write_text(
        "namespace: ns\nresources: [../base]\npatches: [{path: p.yaml}]\n"
        "images: [{name: img, newName: r/img, newTag: '2'}]\n"
        "replicas: [{name: app, count: 3}]\n"
    )
    (overlay / "p.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n"
        "  template:\n    spec:\n      containers:\n"
        "        - {name: a, env: [{name: Y, value: '3'}, {name: Z, value: '4'}],"
        " readinessProbe: {grpc: null, exec: {command: [probe]}}}\n"
    )
    (app,) = render(overlay)
    a, b = app["spec"]["template"]["spec"]["containers"]
    # kustomize puts what a patch adds first: Z, then the base's X and the patched Y
    assert a["env"] == [
        {"name": "Z", "value": "4"},
        {"name": "X", "value": "1"},
        {"name": "Y", "value": "3"},
    ]
    assert a["readinessProbe"] == {"exec": {"command": ["probe"]}}
    assert (a["image"], b["image"]) == ("r/img:2", "other")
    assert app["metadata"]["namespace"] == "ns" and app["spec"]["replicas"] == 3
    (overlay / "p.yaml").write_text(
        f"{(overlay / 'p.yaml').read_text()}---\n{(overlay / 'p.yaml').read_text()}"
    )
    with pytest.raises(ValueError, match="one patch per file"):
        render(overlay)
    (overlay / "kustomization.yaml").write_text("resources: [../base]\ncomponents: [x]\n")
    with pytest.raises(ValueError, match="not supported"):
        render(overlay)
