"""What the Kubernetes manifest checks in test_k8s_manifests.py are made of: loading k8s/*.yaml,
KubeRay's CRDs (from $RAYFT_KUBERAY_CRDS, else ../shared/kuberay-crds) turned into JSON
schemas, `manifest_problems(doc)` for any kind, and the checks that a RayService's
applications build with rayft's services and a RayJob's config loads with rayft's loader."""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import os
import re
import shlex
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.config import load_config
from services.config import API_KEY_ENV, ServeConfig

REPO = Path(__file__).resolve().parents[2]
CRDS_ENV = "RAYFT_KUBERAY_CRDS"
CRD_DIR = Path(os.environ.get(CRDS_ENV) or REPO.parent / "shared" / "kuberay-crds")
needs_crds = pytest.mark.skipif(
    not CRD_DIR.is_dir(),
    reason=f"KubeRay's CRDs not found at {CRD_DIR}: the manifests' schema check needs them (set {CRDS_ENV} "
           "to a folder of KubeRay's CRD YAMLs, e.g. ray-operator/config/crd/bases of the KubeRay repo)")
MANIFESTS = sorted((REPO / "k8s").glob("*.yaml"))
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")  # DNS-1123 subdomain


def load_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=LOADER) if doc is not None]


@functools.cache
def _crds_in(path: Path) -> dict[str, dict]:
    docs = load_docs(path)
    return {doc["spec"]["names"]["kind"]: doc for doc in docs if doc.get("kind") == "CustomResourceDefinition"}


def crd(kind: str) -> dict | None:
    """The CustomResourceDefinition of `kind`; files named after it (ray.io_rayservices.yaml)
    are read first, as parsing one takes a fraction of a second."""
    for path in sorted(CRD_DIR.glob("*.yaml"), key=lambda p: kind.lower() not in p.name):
        if kind in _crds_in(path):
            return _crds_in(path)[kind]
    return None


def json_schema(node: dict) -> dict:
    """A CRD's OpenAPI v3 schema as JSON Schema, with the Kubernetes semantics:
    - `x-kubernetes-int-or-string`: an integer or a string (anyOf added where the CRD has none);
    - `nullable`: null is accepted as well;
    - unknown fields are errors (the API server's strict field validation, kubectl's default),
      except under `x-kubernetes-preserve-unknown-fields` or an explicit additionalProperties;
    - `x-kubernetes-list-type: set` has unique items; `map` unique `x-kubernetes-list-map-keys`.
    Not checked: CEL rules (`x-kubernetes-validations`), int32/int64 ranges, ObjectMeta (the
    API server's own; manifest_problems checks metadata.name)."""
    out = dict(node)
    if "properties" in out:
        out["properties"] = {name: json_schema(sub) for name, sub in out["properties"].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = json_schema(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [json_schema(sub) for sub in out[key]]
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out \
            and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return {"anyOf": [{"type": "null"}, out]} if out.get("nullable") else out


def _unique_map_keys(validator, keys, instance, schema):
    """`x-kubernetes-list-map-keys`: no two items share their keys (absent keys take the default)."""
    if schema.get("x-kubernetes-list-type") != "map" or not validator.is_type(instance, "array"):
        return
    props = schema.get("items", {}).get("properties", {})
    seen = set()
    for item in instance:
        if isinstance(item, dict):
            key = tuple(item.get(k, props.get(k, {}).get("default")) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate item with {dict(zip(keys, key))}")
            seen.add(key)


K8sValidator = jsonschema.validators.extend(jsonschema.Draft4Validator,
                                            {"x-kubernetes-list-map-keys": _unique_map_keys})


@functools.cache
def validator(kind: str, version: str) -> jsonschema.protocols.Validator:
    (served,) = [v for v in crd(kind)["spec"]["versions"] if v["name"] == version]
    return K8sValidator(json_schema(served["schema"]["openAPIV3Schema"]))


# Core kinds that travel with the custom resources (no CRD describes them): a minimal schema
# each, enough to catch a misspelt field or a value of the wrong type.
_DATA_MAP = {"type": "object", "patternProperties": {r"^[-._a-zA-Z0-9]+$": {"type": "string"}},
             "additionalProperties": False}  # keys: valid file names; values: strings
CORE_KINDS = {
    ("v1", "ConfigMap"): {
        "type": "object", "required": ["apiVersion", "kind", "metadata"], "additionalProperties": False,
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
                       "data": _DATA_MAP, "binaryData": _DATA_MAP, "immutable": {"type": "boolean"}}},
}


def _core_problems(doc: dict) -> list[str]:
    problems = []
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 name")
    for error in jsonschema.Draft4Validator(CORE_KINDS[doc["apiVersion"], doc["kind"]]).iter_errors(doc):
        path = ".".join(str(p) for p in error.absolute_path)
        problems.append(f"{path or '<root>'}: {error.message}")
    return sorted(problems)


def manifest_problems(doc: dict) -> list[str]:
    """What the API server would refuse in `doc` (a custom resource, or one of CORE_KINDS),
    as 'field.path: message'."""
    kind = doc.get("kind")
    if (doc.get("apiVersion"), kind) in CORE_KINDS:
        return _core_problems(doc)
    if crd(kind) is None:
        return [f"kind: no CRD for {kind!r} in {CRD_DIR}, and not a core kind checked here "
                f"({', '.join(f'{v}/{k}' for v, k in CORE_KINDS)})"]
    spec = crd(kind)["spec"]
    group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    versions = {v["name"]: v for v in spec["versions"] if v.get("served")}
    if group != spec["group"] or version not in versions:
        return [f"apiVersion: {doc.get('apiVersion')!r} is not served; use {spec['group']}/<{'|'.join(versions)}>"]
    problems = []
    if versions[version].get("deprecated"):
        problems.append(f"apiVersion: {versions[version].get('deprecationWarning', 'deprecated')}")
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not NAME.match(name):
        problems.append(f"metadata.name: {name!r} is not a DNS-1123 name")
    for error in validator(kind, version).iter_errors(doc):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path).lstrip(".")
        problems.append(f"{path or '<root>'}: {error.message}")
    return sorted(problems)


# --- RayService: the Ray Serve config and rayft's application builder ------------------------

def serve_apps(doc: dict) -> list[dict]:
    """The applications of a RayService's serveConfigV2 (a YAML string), checked against Ray
    Serve's own schema of that config (what KubeRay sends to the Serve REST API)."""
    from ray.serve.schema import ServeApplicationSchema, ServeDeploySchema

    config = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)
    # Serve ignores unknown keys (forward compatibility); here they are typos.
    assert set(config) <= set(ServeDeploySchema.model_fields), set(config) - set(ServeDeploySchema.model_fields)
    for app in config["applications"]:
        assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
        # Serve checks this when it deploys, not in the schema.
        assert str(app.get("route_prefix", "/")).startswith("/"), f"{app['name']}: route_prefix must start with '/'"
    assert config["applications"], "no applications"
    return config["applications"]


def import_target(import_path: str) -> ast.AST:
    """The top-level definition `module:attr` (or `module.attr`) names, found with importlib
    and read from the module's source: importing services.app itself loads vLLM and torch
    (~10 s), too slow here; tests/e2e serves through it for real."""
    module, sep, attr = import_path.partition(":")
    if not sep:
        module, _, attr = import_path.rpartition(".")
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{import_path}: no module {module}"
    for node in ast.parse(Path(spec.origin).read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == attr:
            return node
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == attr for t in node.targets):
            return node
    raise AssertionError(f"{import_path}: {module} defines no {attr}")


def _fits(value, hint) -> bool:
    """`value` (as YAML gives it) has the type of a ServeConfig field."""
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if typing.get_origin(hint) is dict:
        key_type, value_type = typing.get_args(hint)
        return isinstance(value, dict) and all(_fits(k, key_type) and _fits(v, value_type) for k, v in value.items())
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, (int, float) if hint is float else hint)


def serve_args_problems(args: dict) -> list[str]:
    """What rayft's app_builder would refuse in an application's args."""
    hints = typing.get_type_hints(ServeConfig)
    names = {f.name for f in dataclasses.fields(ServeConfig)}
    problems = [f"{key}: not a ServeConfig key" for key in sorted(set(args) - names)]
    problems += [f"{key}: {value!r} is not {hints[key]}" for key, value in args.items()
                 if key in names and not _fits(value, hints[key])]
    if not problems:
        try:
            ServeConfig(**args).validate()
        except ValueError as exc:
            problems.append(str(exc))
    return problems


def containers(doc: dict) -> list[dict]:
    cluster = doc["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"]] + cluster.get("workerGroupSpecs", [])
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def rayservices(path: Path) -> list[dict]:
    return [doc for doc in load_docs(path) if doc.get("kind") == "RayService"]


RAYFT_BUILDER = "services.app:app_builder"


def check_pods_can_serve(doc: dict, args: dict) -> None:
    """The builder and the replicas may run in any pod: each gets the API key from a Secret
    and mounts the directories served."""
    served = [args["model"], *args.get("adapters", {}).values()]
    for container in containers(doc):
        env = {e["name"]: e for e in container.get("env", [])}
        assert "secretKeyRef" in env.get(API_KEY_ENV, {}).get("valueFrom", {}), f"{container['name']}: {API_KEY_ENV}"
        mounts = [m["mountPath"].rstrip("/") + "/" for m in container.get("volumeMounts", [])]
        for d in served:
            assert any((d.rstrip("/") + "/").startswith(m) for m in mounts), f"{container['name']}: {d} is not mounted"


# --- RayJob and RayCluster: the run's config, shared storage, the cluster's layout -------------

def docs_of(path: Path, kind: str) -> list[dict]:
    return [doc for doc in load_docs(path) if doc.get("kind") == kind]


def pod_specs(cluster: dict) -> list[dict]:
    """The pod specs of a RayCluster spec (RayCluster.spec, RayJob.spec.rayClusterSpec)."""
    return [g["template"]["spec"] for g in [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]]


def mounts(pod: dict, container: dict) -> dict[str, dict]:
    """mountPath -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"].rstrip("/"): volumes[m["name"]] for m in container.get("volumeMounts", [])}


def shared_mounts(cluster: dict) -> set[str]:
    """Paths where every container of every pod mounts the same PersistentVolumeClaim."""
    per_container = [{(path, vol["persistentVolumeClaim"]["claimName"])
                      for path, vol in mounts(pod, c).items() if "persistentVolumeClaim" in vol}
                     for pod in pod_specs(cluster) for c in pod["containers"]]
    return {path for path, _ in set.intersection(*per_container)}


def on_shared(path: str, shared: set[str]) -> bool:
    return any(path == m or path.startswith(m + "/") for m in shared)


def job_config(rayjob: dict, configmaps: list[dict]) -> tuple[str, str, list[str]]:
    """(path, text, key=value overrides) of the config a RayJob's `rayft train CONFIG [k=v ...]`
    entrypoint reads: a key of a ConfigMap (from the same file) mounted in the head pod, where
    the entrypoint runs."""
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    assert argv[:2] == ["rayft", "train"] and len(argv) > 2, f"entrypoint is not `rayft train CONFIG`: {argv}"
    config_path, overrides = argv[2], [a for a in argv[3:] if "=" in a and not a.startswith("-")]
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    for mount_path, volume in sorted(mounts(head, head["containers"][0]).items(), key=lambda m: -len(m[0])):
        if config_path.startswith(mount_path + "/"):
            break
    else:
        raise AssertionError(f"{config_path}: no volume of the head pod is mounted there")
    assert "configMap" in volume, f"{mount_path} is not a ConfigMap volume"
    name, relative = volume["configMap"]["name"], config_path[len(mount_path) + 1:]
    items = {i["path"]: i["key"] for i in volume["configMap"].get("items", [])}
    key = items.get(relative) if items else relative
    by_name = {cm["metadata"]["name"]: cm for cm in configmaps}
    assert name in by_name, f"ConfigMap {name} is not in the file"
    assert key in by_name[name].get("data", {}), f"ConfigMap {name} has no key {key!r} (for {config_path})"
    return config_path, by_name[name]["data"][key], overrides


def check_rayjob_config(rayjob: dict, configmaps: list[dict], tmp_path: Path):
    """The RayJob's config loads as `rayft train` would load it, and what the run reads and
    writes is on storage every pod shares."""
    config_path, text, overrides = job_config(rayjob, configmaps)
    local = tmp_path / Path(config_path).name  # the same file name: the default run name is its stem
    local.write_text(text, encoding="utf-8")
    config = load_config(local, overrides)
    shared = shared_mounts(rayjob["spec"]["rayClusterSpec"])
    for key, path in [("output_dir", config.output_dir), ("model.path", config.model.path),
                      *((f"data.train[{i}]", s.path) for i, s in enumerate(config.data.train))]:
        assert on_shared(path, shared), f"{key}: {path} is not on storage every pod mounts ({sorted(shared)})"
    return config
