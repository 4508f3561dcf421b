"""The Kubernetes manifests in k8s/: every document validates against the openAPIV3Schema
of its kind's CustomResourceDefinition (KubeRay's own CRDs, kept in ../shared/kuberay-crds
beside the repo), and a RayService's serveConfigV2 is a Ray Serve config whose applications
build with rayft's services (import path found, args are valid ServeConfig keys and values).

`manifest_problems(doc)` works for any kind with a CRD there; every k8s/*.yaml is picked up
by the parametrization, so a new RayCluster or RayJob manifest is checked on arrival.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import functools
import importlib.util
import re
import typing
from pathlib import Path

import jsonschema
import pytest
import yaml

from services.config import API_KEY_ENV, ServeConfig

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "kuberay-crds"
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


def manifest_problems(doc: dict) -> list[str]:
    """What the API server would refuse in `doc` (a custom resource), as 'field.path: message'."""
    kind = doc.get("kind")
    if crd(kind) is None:
        return [f"kind: no CRD for {kind!r} in {CRD_DIR}"]
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


# --- tests ------------------------------------------------------------------------------------

def test_manifests_and_crds_are_there():
    assert CRD_DIR.is_dir(), f"KubeRay CRDs expected beside the repo at {CRD_DIR}"
    assert {"ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"} <= \
        {p.name for p in CRD_DIR.glob("*.yaml")}
    assert MANIFESTS


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_its_crd(path):
    docs = load_docs(path)
    assert docs
    for doc in docs:
        assert manifest_problems(doc) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_rayservice_applications_build(path):
    for doc in rayservices(path):
        for app in serve_apps(doc):
            target = import_target(app["import_path"])
            if "args" in app:  # an application builder, called with the args dict
                assert isinstance(target, ast.FunctionDef) and len(target.args.args) == 1, app["import_path"]
            if app["import_path"] == RAYFT_BUILDER:
                assert serve_args_problems(app.get("args") or {}) == []
                check_pods_can_serve(doc, app["args"])


# --- the checks are only worth something if they refuse broken manifests ----------------------

DELETE = object()


def _set(path: str, value):
    def mutate(doc):
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[int(p)] if p.isdigit() else node[p]
        if value is DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return mutate


HEAD = "spec.rayClusterConfig.headGroupSpec"
WORKER = "spec.rayClusterConfig.workerGroupSpecs.0"
BROKEN = {
    "replicas-not-int": (_set(f"{WORKER}.replicas", "two"), "replicas: 'two' is not of type 'integer'"),
    "required-missing": (_set(f"{WORKER}.groupName", DELETE), "'groupName' is a required property"),
    "head-template-missing": (_set(f"{HEAD}.template", DELETE), "'template' is a required property"),
    "unknown-field": (_set(f"{HEAD}.rayStartParam", {}), "Additional properties are not allowed"),
    "start-param-not-string": (_set(f"{HEAD}.rayStartParams.num-cpus", 0), "0 is not of type 'string'"),
    "quantity-not-int-or-string": (_set(f"{WORKER}.template.spec.containers.0.resources.limits.cpu", [8]),
                                   "limits.cpu: [8] is not valid"),
    "quantity-garbage": (_set(f"{WORKER}.template.spec.containers.0.resources.limits.memory", "lots"),
                         "limits.memory: 'lots' does not match"),
    "duplicate-port": (_set(f"{HEAD}.template.spec.containers.0.ports.1.containerPort", 6379),
                       "duplicate item with {'containerPort': 6379, 'protocol': 'TCP'}"),
    "wrong-version": (_set("apiVersion", "ray.io/v2"), "apiVersion: 'ray.io/v2' is not served"),
    "deprecated-version": (_set("apiVersion", "ray.io/v1alpha1"), "deprecated"),
    "bad-name": (_set("metadata.name", "Rayft_Serve"), "metadata.name"),
}


@pytest.fixture(scope="module")
def rayservice():
    return rayservices(REPO / "k8s" / "rayservice-serve.yaml")[0]


@pytest.mark.parametrize("case", BROKEN)
def test_broken_manifest_is_refused(rayservice, case):
    mutate, expected = BROKEN[case]
    doc = copy.deepcopy(rayservice)
    mutate(doc)
    problems = manifest_problems(doc)
    assert any(expected in p for p in problems), problems


def test_int_or_string_takes_both(rayservice):
    doc = copy.deepcopy(rayservice)
    _set(f"{WORKER}.template.spec.containers.0.resources.limits.cpu", 8)(doc)
    _set(f"{WORKER}.template.spec.containers.0.resources.requests.cpu", "8000m")(doc)
    assert manifest_problems(doc) == []


@pytest.mark.parametrize("change, expected", [
    ({"max_replica": 2}, "max_replica: not a ServeConfig key"),
    ({"max_replicas": "2"}, "max_replicas: '2' is not <class 'int'>"),
    ({"device": "gpu"}, "device: 'gpu' is not"),
    ({"adapters": {"a/b": "/models/x"}}, "adapters.a/b"),
    ({"min_replicas": 3}, "min_replicas: 3 is above max_replicas 2"),
    ({"model": ""}, "model: give a model directory"),
])
def test_broken_serve_args_are_refused(rayservice, change, expected):
    args = {**serve_apps(rayservice)[0]["args"], **change}
    problems = serve_args_problems(args)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("import_path", ["services.app:app_buildr", "services.apps:app_builder", "services.app"])
def test_unknown_import_path_is_refused(import_path):
    with pytest.raises(AssertionError):
        import_target(import_path)


@pytest.mark.parametrize("mutate", [_set(f"{WORKER}.template.spec.containers.0.env", []),
                                    _set(f"{HEAD}.template.spec.containers.0.volumeMounts", [])],
                         ids=["worker-without-key", "head-without-models"])
def test_pod_that_cannot_serve_is_refused(rayservice, mutate):
    doc = copy.deepcopy(rayservice)
    mutate(doc)
    with pytest.raises(AssertionError):
        check_pods_can_serve(doc, serve_apps(doc)[0]["args"])


@pytest.mark.parametrize("old, new", [("route_prefix: /", "route_prefix: rayft"),       # refused when Serve deploys
                                      ("route_prefix:", "route_prefx:"),                # a typo Serve ignores
                                      ("applications:", "apps:"),                       # Serve's schema
                                      ("args:", "deployments: 3\n    args:")])          # Serve's schema
def test_broken_serve_config_is_refused(rayservice, old, new):
    doc = copy.deepcopy(rayservice)
    assert old in doc["spec"]["serveConfigV2"]
    doc["spec"]["serveConfigV2"] = doc["spec"]["serveConfigV2"].replace(old, new)
    with pytest.raises((AssertionError, ValueError)):
        serve_apps(doc)
