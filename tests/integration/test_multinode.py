"""Multi-node placement on one machine: a 2-node Ray cluster (head + a second node process,
`ray.cluster_utils.Cluster`) joined by address, as a real cluster is. Training workers and
rollout engines go where `cluster.placement` / `rollout.placement` say (spread: one per
node; pack: one node), and the runs complete with checkpoints and final/ in the shared run
directory (a local path both nodes see).

The scenario runs in a subprocess (tests/integration/multinode_run.py): this pytest process
may already be a driver of the session's single-node cluster (conftest's `ray_cluster`), and
a process drives one cluster at a time. It prints one JSON line asserted on here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("multinode_run.py")
REPO = SCRIPT.parents[2]


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("multinode")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(workdir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"multinode_run.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["workdir"] = workdir
    return out


def _where(out: dict, node_ids: list[str]) -> list[str]:
    return sorted(out["nodes"].get(n, f"unknown:{n}") for n in node_ids)


def test_two_nodes(scenario):
    assert sorted(scenario["nodes"].values()) == ["head", "second"]


def test_spread_training_runs_a_worker_per_node_and_checkpoints_to_shared_storage(scenario):
    run = scenario["train"]["spread"]
    assert _where(scenario, run["worker_nodes"]) == ["head", "second"], run
    assert run["steps"] == 4
    assert Path(run["run_dir"]).is_relative_to(scenario["workdir"] / "shared")
    assert run["checkpoints"] == ["step_00000002", "step_00000004"]
    assert run["summary_checkpoint"] == str(Path(run["run_dir"]) / "checkpoints" / "step_00000004")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(run["final"])
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (Path(run["run_dir"]) / name).is_file(), name


def test_pack_training_keeps_both_workers_on_one_node(scenario):
    run = scenario["train"]["pack"]
    assert len(run["worker_nodes"]) == 2 and len(set(run["worker_nodes"])) == 1, run
    assert run["steps"] == 2 and run["checkpoints"] == ["step_00000002"]
    assert (Path(run["run_dir"]) / "final" / "adapter_model.safetensors").is_file()


def test_rollout_engines_follow_rollout_placement(scenario):
    spread, pack = scenario["pool"]["spread"], scenario["pool"]["pack"]
    assert _where(scenario, spread["engine_nodes"]) == ["head", "second"], spread
    assert len(pack["engine_nodes"]) == 2 and len(set(pack["engine_nodes"])) == 1, pack
    assert spread["generated"] == pack["generated"] == [1, 1, 1, 1]
