"""The multi-node scenario of test_multinode.py, run in its own process (a pytest process
may already hold the session's single-node cluster, and a Ray driver joins one cluster).

    python tests/integration/multinode_run.py WORKDIR [--only train|pool]

Starts a 2-node Ray cluster on this machine with `ray.cluster_utils.Cluster` (a head and a
second node process, 2 CPUs each, no dashboard), builds a tiny model and data under WORKDIR
(a local path: storage both nodes see), then
  - runs a tiny SFT LoRA job on 2 Ray Train workers through `cluster.train.run_training`
    with `cluster.address=<the cluster>`, with cluster.placement=spread (4 steps, a
    checkpoint every 2) and then pack (2 steps), recording the node of every Train worker;
  - starts a 2-engine RolloutPool (hf engines) with rollout.placement=spread, then pack,
    recording each engine's node and checking it generates;
and prints one JSON object (the last line of stdout) for the test to assert on.
Where an actor ran is read from the GCS actor table (dead actors included), the same
table `ray.cluster_utils.Cluster` reads: no dashboard needed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo, when run as a script

os.environ.pop("RAY_ADDRESS", None)           # join only the cluster started here
# Token authentication, as clusters from `ray.init()` (and `ray start` where a token file
# exists) have by default, with a token of this cluster's own: the nodes started below
# inherit it, and so does run_training's ray.init(address=...). (Without it, ensure_ray
# still turns auth on in the driver when ~/.ray/auth_token exists, and the auth-less nodes
# that ray.cluster_utils starts then cancel the Train controller actor.)
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CPUS_PER_NODE = 2
TRAIN_WORKER_CLASS = "RayTrainWorker"          # Ray Train V2's worker actor


def actor_nodes(class_name: str | None = None, actor_ids: set[str] | None = None) -> dict[str, str]:
    """actor id -> node id of the actors of `class_name` (or with the given ids), alive or dead."""
    from services.ray_compat import actor_table

    return {aid: info["Address"]["NodeID"] for aid, info in actor_table().items()
            if (class_name is None or info["ActorClassName"] == class_name)
            and (actor_ids is None or aid in actor_ids)}


def wait_idle(timeout_s: float = 30.0) -> None:
    """Until every CPU is free again: killed actors and removed placement groups release
    theirs asynchronously, and a PACK group created meanwhile finds no node with room for
    all its bundles, so Ray (best effort) splits it."""
    import ray

    deadline = time.time() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources().get("CPU", 0) and time.time() < deadline:
        time.sleep(0.2)


def train(workdir: Path, model_dir: Path, data: Path, address: str, placement: str, steps: int) -> dict:
    from cluster.config import load_config
    from cluster.train import run_training
    from trainers.checkpoint import checkpoint_complete

    wait_idle()
    before = set(actor_nodes(TRAIN_WORKER_CLASS))
    config = load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data}]", "data.max_length=32", "data.eval_fraction=0.1",
        f"output_dir={workdir / 'shared' / 'runs'}", f"name=sft-{placement}", "peft.method=lora", "peft.r=4",
        "train.batch_size=4", f"train.max_steps={steps}", "train.save_every=2", "train.eval_every=0",
        "train.keep_checkpoints=2", "cluster.num_workers=2", "cluster.cpus_per_worker=1",
        f"cluster.placement={placement}", f"cluster.address={address}"])
    started = time.time()
    summary = run_training(config, echo=lambda *_: None)
    workers = {a: n for a, n in actor_nodes(TRAIN_WORKER_CLASS).items() if a not in before}
    run_dir = config.run_dir
    return {
        "seconds": round(time.time() - started, 1),
        "steps": summary["steps"],
        "worker_nodes": sorted(workers.values()),
        "run_dir": str(run_dir),
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step_*") if checkpoint_complete(p) is None),
        "final": sorted(p.name for p in (run_dir / "final").iterdir()) if (run_dir / "final").is_dir() else [],
        "summary_checkpoint": summary["checkpoint"],
    }


def pool(model_dir: Path, placement: str) -> dict:
    from rollout.config import RolloutConfig
    from rollout.engine import Sampling
    from rollout.pool import RolloutPool

    wait_idle()
    started = time.time()
    p = RolloutPool(str(model_dir), RolloutConfig(engine="hf", num_engines=2, placement=placement))
    try:
        ids = {e._actor_id.hex() for e in p.engines}
        nodes = actor_nodes(actor_ids=ids)
        groups = p.generate([[{"role": "user", "content": f"What is {i} + {i}?"}] for i in range(4)],
                            Sampling(temperature=0.0, max_new_tokens=4))
    finally:
        p.shutdown()
    return {"seconds": round(time.time() - started, 1), "engine_nodes": sorted(nodes.values()),
            "engines_found": len(nodes), "generated": [len(g) for g in groups]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--only", choices=["train", "pool"])
    args = parser.parse_args()
    workdir = args.workdir.resolve()

    import ray
    from ray.cluster_utils import Cluster

    from trainers.data import write_synth
    from trainers.models import build_model

    t0 = time.time()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": CPUS_PER_NODE, "resources": {"head_node": 1}, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=CPUS_PER_NODE, resources={"second_node": 1})
        cluster.wait_for_nodes()
        model_dir = build_model("tiny", workdir / "shared" / "models" / "tiny")
        data = write_synth("addition", 64, workdir / "shared" / "data" / "addition.jsonl", seed=0)
        from cluster.ray_env import ensure_ray

        ensure_ray(cluster.address)  # what run_training does with cluster.address set
        nodes = {n["NodeID"]: ("head" if "head_node" in n["Resources"] else "second")
                 for n in ray.nodes() if n["Alive"]}
        out: dict = {"address": cluster.address, "nodes": nodes, "setup_s": round(time.time() - t0, 1)}
        if args.only in (None, "train"):
            # pack only has to show where the workers go: 2 steps (one checkpoint) are enough
            out["train"] = {p: train(workdir, model_dir, data, cluster.address, p, steps)
                            for p, steps in (("spread", 4), ("pack", 2))}
        if args.only in (None, "pool"):
            out["pool"] = {p: pool(model_dir, p) for p in ("spread", "pack")}
        out["total_s"] = round(time.time() - t0, 1)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
