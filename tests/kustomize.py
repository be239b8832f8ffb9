"""Renders a Kustomize directory offline: the subset of `kubectl kustomize` that
deploy/kubernetes uses, so `make test` can render and validate every overlay on a
machine with no kubectl and no kustomize binary (and no pip package that builds them).

Supported, with kustomize's semantics:
- `resources`: YAML files (several documents each) and directories holding a
  kustomization, rendered first;
- `namespace`: set on every namespaced resource (not on Namespace itself);
- `labels` (`pairs`; `includeSelectors: true` also sets selectors and pod templates);
- `images` (`name` -> `newName`/`newTag`/`digest`) in containers and init containers;
- `replicas` (`name`, `count`);
- `secretGenerator` / `configMapGenerator` with `envs` and `literals`, only with
  `generatorOptions.disableNameSuffixHash: true` (the hashed names are not reproduced);
- `patches` with `path` to one strategic-merge patch, whose kind and name pick the target:
  maps merge, `null` deletes a key, lists of containers, init containers, env vars and
  volumes merge by `name` and volume mounts by `mountPath` (items the patch adds go
  first, as kustomize puts them); other lists are replaced.

Anything else in a kustomization is refused (ValueError), never ignored.

    python -m tests.kustomize deploy/kubernetes/overlays/prod
"""

from __future__ import annotations

import base64
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

Resource = dict[str, Any]

_SUPPORTED = {
    "apiVersion",
    "kind",
    "resources",
    "namespace",
    "labels",
    "images",
    "replicas",
    "secretGenerator",
    "configMapGenerator",
    "generatorOptions",
    "patches",
}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}
# Strategic-merge keys of the lists that merge item by item (the Kubernetes API's
# patchMergeKey for the fields these manifests patch).
_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


def render(directory: Path) -> list[Resource]:
    """The resources `kubectl kustomize directory` prints, in the same order."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - _SUPPORTED
    if unknown:
        raise ValueError(f"{directory}: kustomization fields not supported: {sorted(unknown)}")
    resources: list[Resource] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        resources += render(path) if path.is_dir() else _load(path)
    resources += _generated(directory, kustomization)
    for patch_entry in kustomization.get("patches", []):
        if set(patch_entry) != {"path"}:
            raise ValueError(f"{directory}: only `patches: - path:` is supported")
        patches = _load(directory / patch_entry["path"])
        if len(patches) != 1:
            # kustomize before 5.2 (kubectl 1.29 and 1.30 carry 5.0.4) takes one patch per
            # file here and refuses a file with several.
            raise ValueError(f"{directory}: {patch_entry['path']}: one patch per file")
        _apply_patch(resources, patches[0])
    for replica in kustomization.get("replicas", []):
        _find(resources, "Deployment", replica["name"])["spec"]["replicas"] = replica["count"]
    for label in kustomization.get("labels", []):
        _label(resources, label)
    for image in kustomization.get("images", []):
        _set_images(resources, image)
    namespace = kustomization.get("namespace")
    if namespace:
        for resource in resources:
            if resource["kind"] not in _CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = namespace
    return resources


def _load(path: Path) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _generated(directory: Path, kustomization: dict[str, Any]) -> list[Resource]:
    generators = [("Secret", g) for g in kustomization.get("secretGenerator", [])]
    generators += [("ConfigMap", g) for g in kustomization.get("configMapGenerator", [])]
    if generators and not kustomization.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise ValueError(f"{directory}: generators need disableNameSuffixHash: true here")
    made = []
    for kind, generator in generators:
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            for line in (directory / env_file).read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    key, _, value = line.partition("=")
                    data[key.strip()] = value
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        resource: Resource = {
            "apiVersion": "v1",
            "kind": kind,
            "metadata": {"name": generator["name"]},
        }
        if kind == "Secret":
            resource["type"] = "Opaque"
            resource["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        else:
            resource["data"] = data
        made.append(resource)
    return made


def _find(resources: list[Resource], kind: str, name: str) -> Resource:
    for resource in resources:
        if resource["kind"] == kind and resource["metadata"]["name"] == name:
            return resource
    raise ValueError(f"no {kind} {name} to change")


def _apply_patch(resources: list[Resource], patch: Resource) -> None:
    target = _find(resources, patch["kind"], patch["metadata"]["name"])
    merged = _merge(target, patch)
    target.clear()
    target.update(merged)


def _merge(base: Any, patch: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for name, value in patch.items():
            if value is None:
                out.pop(name, None)
            elif name in out:
                out[name] = _merge(out[name], value, name)
            else:
                out[name] = _without_nulls(value)
        return out
    merge_key = _MERGE_KEYS.get(key)
    if isinstance(base, list) and isinstance(patch, list) and merge_key:
        out_list = [copy.deepcopy(item) for item in base]
        added = []
        for item in patch:
            match = next(
                (i for i, b in enumerate(out_list) if b[merge_key] == item[merge_key]), None
            )
            if match is None:
                added.append(_without_nulls(item))
            else:
                out_list[match] = _merge(out_list[match], item)
        # kustomize puts a patch's new items before the existing ones (kyaml's merge with
        # ListIncreaseDirection Prepend): the order `$(VAR)` references depend on.
        return added + out_list
    return _without_nulls(patch)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _pod_templates(resource: Resource) -> list[Resource]:
    template = resource.get("spec", {}).get("template")
    return [template] if isinstance(template, dict) else []


def _label(resources: list[Resource], label: dict[str, Any]) -> None:
    pairs = label["pairs"]
    with_selectors = label.get("includeSelectors", False)
    for resource in resources:
        resource["metadata"].setdefault("labels", {}).update(pairs)
        if not with_selectors:
            continue
        for template in _pod_templates(resource):
            template.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        spec = resource.get("spec", {})
        if isinstance(spec.get("selector"), dict):
            selector = spec["selector"]
            (selector.setdefault("matchLabels", {}) if "template" in spec else selector).update(
                pairs
            )


def _set_images(resources: list[Resource], image: dict[str, str]) -> None:
    for resource in resources:
        for template in _pod_templates(resource):
            pod = template.get("spec", {})
            for container in pod.get("containers", []) + pod.get("initContainers", []):
                name, _, tag = container["image"].partition(":")
                if name != image["name"]:
                    continue
                new = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{new}@{image['digest']}"
                else:
                    new_tag = image.get("newTag", tag)
                    container["image"] = f"{new}:{new_tag}" if new_tag else new


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.kustomize DIRECTORY", file=sys.stderr)
        return 2
    print(yaml.safe_dump_all(render(Path(argv[0])), sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
