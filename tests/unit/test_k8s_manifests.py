"""The Kubernetes manifests in k8s/: every document validates against the openAPIV3Schema
of its kind's CustomResourceDefinition (KubeRay's own CRDs: the folder named by
$RAYFT_KUBERAY_CRDS, else ../shared/kuberay-crds beside the repo; where neither is there
the checks against them are skipped, saying so, and the rest run), and a RayService's serveConfigV2 is a Ray Serve config whose applications
build with rayft's services (import path found, args are valid ServeConfig keys and values).

`manifest_problems(doc)` works for any kind with a CRD there, and for the few core kinds
the manifests carry beside them (a ConfigMap), checked against a minimal schema; any other
kind, an unknown ray.io kind above all, is a problem. Every k8s/*.yaml is picked up by the
parametrization, so a new manifest is checked on arrival. A RayJob's config (a ConfigMap
key mounted where its `rayft train` entrypoint reads it) loads with rayft's own config
loader, and its paths are on storage that every pod of the cluster mounts; the RayCluster
has the layout k8s/README.md describes.
"""

from __future__ import annotations

import ast
import copy
import os

import pytest

from tests.unit.k8s_checks import (
    CORE_KINDS, CRD_DIR, CRDS_ENV, MANIFESTS, RAYFT_BUILDER, REPO, check_pods_can_serve, check_rayjob_config,
    docs_of, import_target, load_docs, manifest_problems, needs_crds, rayservices, serve_apps,
    serve_args_problems, shared_mounts,
)
from trainers.errors import ConfigError


def test_manifests_are_there():
    assert MANIFESTS


@pytest.mark.skipif(not os.environ.get(CRDS_ENV), reason=f"{CRDS_ENV} not set")
def test_crds_are_where_the_environment_says():
    assert CRD_DIR.is_dir(), f"{CRDS_ENV}={CRD_DIR}: no such folder"


@needs_crds
def test_crds_are_there():
    assert {"ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"} <= \
        {p.name for p in CRD_DIR.glob("*.yaml")}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_core_kind_documents_are_valid(path):
    """The documents no CRD describes (a ConfigMap) are checked with or without the CRDs."""
    for doc in load_docs(path):
        if (doc.get("apiVersion"), doc.get("kind")) in CORE_KINDS:
            assert manifest_problems(doc) == []


@needs_crds
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


@needs_crds
@pytest.mark.parametrize("case", BROKEN)
def test_broken_manifest_is_refused(rayservice, case):
    mutate, expected = BROKEN[case]
    doc = copy.deepcopy(rayservice)
    mutate(doc)
    problems = manifest_problems(doc)
    assert any(expected in p for p in problems), problems


@needs_crds
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


# --- RayJob: its config, storage and lifecycle -------------------------------------------------

RAYJOB_FILE = REPO / "k8s" / "rayjob-train.yaml"
RAYCLUSTER_FILE = REPO / "k8s" / "raycluster.yaml"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_rayjob_config_loads_and_lives_on_shared_storage(path, tmp_path):
    for rayjob in docs_of(path, "RayJob"):
        check_rayjob_config(rayjob, docs_of(path, "ConfigMap"), tmp_path)


def test_rayjob_train(tmp_path):
    (rayjob,) = docs_of(RAYJOB_FILE, "RayJob")
    config = check_rayjob_config(rayjob, docs_of(RAYJOB_FILE, "ConfigMap"), tmp_path)
    assert config.method == "sft" and config.peft.method == "lora" and config.output_dir == "/shared/runs"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] > 0
    cluster = spec["rayClusterSpec"]
    gpus = sum(g["replicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in cluster["workerGroupSpecs"])
    assert gpus >= config.cluster.num_workers, "fewer GPUs than Ray Train workers"


@pytest.fixture(scope="module")
def rayjob_docs():
    return docs_of(RAYJOB_FILE, "RayJob")[0], docs_of(RAYJOB_FILE, "ConfigMap")


def _with_job_yaml(configmaps, old, new):
    configmaps = copy.deepcopy(configmaps)
    text = configmaps[0]["data"]["job.yaml"]
    assert old in text
    configmaps[0]["data"]["job.yaml"] = text.replace(old, new)
    return configmaps


@pytest.mark.parametrize("case", ["other-file", "not-mounted", "no-configmap", "not-rayft", "misspelt-key",
                                  "bad-value", "output-not-shared", "data-not-shared", "bad-override"])
def test_broken_rayjob_config_is_refused(rayjob_docs, case, tmp_path):
    rayjob, configmaps = copy.deepcopy(rayjob_docs[0]), rayjob_docs[1]
    if case == "other-file":
        rayjob["spec"]["entrypoint"] = "rayft train /config/train.yaml"
    elif case == "not-mounted":
        rayjob["spec"]["entrypoint"] = "rayft train /etc/rayft/job.yaml"
    elif case == "no-configmap":
        configmaps = []
    elif case == "not-rayft":
        rayjob["spec"]["entrypoint"] = "python train.py /config/job.yaml"
    elif case == "misspelt-key":
        configmaps = _with_job_yaml(configmaps, "\ntrain:", "\ntrian:")
    elif case == "bad-value":
        configmaps = _with_job_yaml(configmaps, "placement: spread", "placement: scatter")
    elif case == "output-not-shared":
        configmaps = _with_job_yaml(configmaps, "output_dir: /shared/runs", "output_dir: /tmp/runs")
    elif case == "data-not-shared":
        configmaps = _with_job_yaml(configmaps, "[/shared/data/train.jsonl]", "[/data/train.jsonl]")
    elif case == "bad-override":
        rayjob["spec"]["entrypoint"] += " output_dir=/tmp/runs"
    with pytest.raises((AssertionError, ConfigError)):
        check_rayjob_config(rayjob, configmaps, tmp_path)


@pytest.mark.parametrize("change, expected", [
    ({"kind": "RayJobs"}, "no CRD for 'RayJobs'"),                            # an unknown ray.io kind
    ({"apiVersion": "ray.io/v1", "kind": "ConfigMap"}, "no CRD for 'ConfigMap'"),
    ({"kind": "Secret", "apiVersion": "v1"}, "no CRD for 'Secret'"),          # a core kind not checked here
])
def test_unknown_kind_is_refused(rayjob_docs, change, expected):
    doc = {**copy.deepcopy(rayjob_docs[0]), **change}
    assert any(expected in p for p in manifest_problems(doc))


@pytest.mark.parametrize("mutate, expected", [
    (_set("datas", {}), "Additional properties are not allowed ('datas'"),
    (lambda doc: doc["data"].update({"job.yaml": 3}), "3 is not of type 'string'"),
    (_set("data", {"job yaml": "x"}), "'job yaml' does not match any"),
    (_set("immutable", "yes"), "'yes' is not of type 'boolean'"),
    (_set("metadata.name", "Train_Config"), "metadata.name"),
])
def test_broken_configmap_is_refused(rayjob_docs, mutate, expected):
    doc = copy.deepcopy(rayjob_docs[1][0])
    mutate(doc)
    assert any(expected in p for p in manifest_problems(doc)), manifest_problems(doc)


@needs_crds
def test_broken_rayjob_is_refused(rayjob_docs):
    doc = copy.deepcopy(rayjob_docs[0])
    doc["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    doc["spec"]["backoffLimit"] = "1"
    problems = manifest_problems(doc)
    assert any("Additional properties are not allowed ('shutdownAfterJobFinish'" in p for p in problems), problems
    assert any(p.startswith("spec.backoffLimit: '1' is not of type 'integer'") for p in problems), problems


# --- RayCluster: a head without work, CPU and GPU groups, autoscaling, shared storage, auth ------

def raycluster_layout_problems(doc: dict) -> list[str]:
    spec, problems = doc["spec"], []
    if spec["headGroupSpec"]["rayStartParams"].get("num-cpus") != "0":
        problems.append("head: rayStartParams num-cpus must be \"0\" (no work on the head)")
    groups = {g["groupName"]: g for g in spec.get("workerGroupSpecs", [])}

    def gpus(group: dict, kind: str) -> int:
        return int(group["template"]["spec"]["containers"][0]["resources"].get(kind, {}).get("nvidia.com/gpu", 0))

    gpu_groups = [name for name, g in groups.items() if gpus(g, "requests") > 0 and gpus(g, "limits") > 0]
    if not gpu_groups:
        problems.append("no worker group requests and limits nvidia.com/gpu")
    if len(gpu_groups) == len(groups):
        problems.append("no CPU worker group")
    if not (spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions")):
        problems.append("autoscaling: enableInTreeAutoscaling and autoscalerOptions")
    if not shared_mounts(spec):
        problems.append("no PersistentVolumeClaim mounted at the same path in every pod")
    auth = spec.get("authOptions", {})
    if auth.get("mode") != "token" or not auth.get("secretName"):
        problems.append("authOptions: token mode with the token from a Secret")
    for g in groups.values():
        if not g.get("minReplicas", 0) <= g.get("replicas", 0) <= g.get("maxReplicas", 0):
            problems.append(f"{g['groupName']}: replicas outside [minReplicas, maxReplicas]")
    return problems


def test_raycluster_layout():
    (doc,) = docs_of(RAYCLUSTER_FILE, "RayCluster")
    assert raycluster_layout_problems(doc) == []
    assert shared_mounts(doc["spec"]) == {"/shared"}


RC_GPU = "spec.workerGroupSpecs.1"


@pytest.mark.parametrize("mutate, expected", [
    (_set("spec.headGroupSpec.rayStartParams.num-cpus", "4"), "num-cpus"),
    (_set(f"{RC_GPU}.template.spec.containers.0.resources.limits", {"cpu": "8"}), "nvidia.com/gpu"),
    (_set("spec.enableInTreeAutoscaling", False), "autoscaling"),
    (_set(f"{RC_GPU}.template.spec.containers.0.volumeMounts.0.mountPath", "/data"), "PersistentVolumeClaim"),
    (_set("spec.authOptions", {"mode": "token"}), "authOptions"),
    (_set(f"{RC_GPU}.replicas", 9), "replicas outside"),
])
def test_broken_raycluster_layout_is_refused(mutate, expected):
    doc = copy.deepcopy(docs_of(RAYCLUSTER_FILE, "RayCluster")[0])
    mutate(doc)
    assert any(expected in p for p in raycluster_layout_problems(doc))
