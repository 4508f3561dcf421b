"""Exact resume: a SIGKILLed training worker process is replaced and the run continues
from the last complete checkpoint with the same losses, dropout on, its data streamed
(`data.streaming`: tokenised by Ray Data, read by the workers from the run directory)
where the uninterrupted run's is held in memory; re-running a finished
run continues it only with its own step plan unless told otherwise; gradient accumulation
and worker count do not change the update."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from cluster.config import load_config
from cluster.train import run_training
from tests.integration.faults import kill_a_worker_after_checkpoint
from trainers.errors import UserError


def _config(tmp_path, model_dir, data, name, *extra):
    return load_config(None, [
        # An explicit eval set: streamed and in-memory builds then hold the same samples in
        # the same order (their held-out splits differ).
        f"model.path={model_dir}", f"data.train=[{data}]", f"data.eval=[{data}]", "data.max_length=48", f"output_dir={tmp_path}",
        f"name={name}", "train.batch_size=8", "train.lr=1e-3", "train.eval_every=10", "train.eval_batches=2",
        "cluster.num_workers=2", *extra])


def _metrics(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dropout_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with attention dropout on: every training step draws from each
    worker's RNG, so a resume that did not restore it would train on other masks."""
    out = tmp_path_factory.mktemp("models") / "tiny-dropout"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"attention_dropout": 0.3}))
    return out


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, dropout_model_dir, addition_data, tmp_path):
    steps = ["train.max_steps=20", "train.save_every=5"]  # the default cluster.max_failures (2) restarts it
    plain = _config(tmp_path, dropout_model_dir, addition_data, "plain", *steps)
    run_training(plain, echo=lambda *_: None)

    crash = _config(tmp_path, dropout_model_dir, addition_data, "crash", *steps, "data.streaming=true")
    with kill_a_worker_after_checkpoint(crash.run_dir, 5) as killed:
        summary = run_training(crash, echo=lambda *_: None)
    assert killed, "no worker was killed"

    rows = _metrics(crash.run_dir)
    resumes = [r for r in rows if r.get("event") == "resume"]
    assert resumes and resumes[0]["step"] in (5, 10, 15), resumes
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21))  # one uninterrupted-looking log
    assert summary["steps"] == 20 and (crash.run_dir / "data").is_dir()
    plain_rows = {r["step"]: r for r in _metrics(plain.run_dir) if "loss" in r}
    crash_rows = {r["step"]: r for r in rows if "loss" in r}
    # Every step trained on the same batches; after the resume, with the same dropout masks.
    for step in range(1, 21):
        assert crash_rows[step]["loss"] == pytest.approx(plain_rows[step]["loss"], rel=1e-5), step
    assert crash_rows[20]["eval_loss"] == pytest.approx(plain_rows[20]["eval_loss"], rel=1e-5)
    # Other dropout masks move a step's loss by ten times that tolerance even at the random
    # start (and the runs' weights drift further apart with every step on other masks).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(dropout_model_dir)).train()
    ids = torch.randint(0, 500, (8, 32), generator=torch.Generator().manual_seed(0))
    losses = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        with torch.no_grad():
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    assert abs(losses[0] - losses[1]) > 1e-4 * losses[0], losses


def test_rerun_continues_and_never_refuses(ray_cluster, tiny_model_dir, addition_data, tmp_path):
    first = _config(tmp_path, tiny_model_dir, addition_data, "again", "train.max_steps=10", "train.save_every=5")
    run_training(first, echo=lambda *_: None)
    longer = _config(tmp_path, tiny_model_dir, addition_data, "again", "train.max_steps=20", "train.save_every=5")
    with pytest.raises(UserError, match=r"train.max_steps: 10 -> 20.*train.resume_changed=true"):
        run_training(longer, echo=lambda *_: None)  # another step plan (and lr schedule): refused
    assert "max_steps: 10" in (longer.run_dir / "config.yaml").read_text()  # kept as the run was
    longer = _config(tmp_path, tiny_model_dir, addition_data, "again", "train.max_steps=20", "train.save_every=5",
                     "train.resume_changed=true")
    summary = run_training(longer, echo=lambda *_: None)
    assert summary["steps"] == 20
    assert [r["step"] for r in _metrics(longer.run_dir) if r.get("event") == "resume"] == [10]
    never = _config(tmp_path, tiny_model_dir, addition_data, "again", "train.max_steps=30", "train.resume=never")
    with pytest.raises(UserError, match="already has checkpoints"):
        run_training(never, echo=lambda *_: None)


def test_accumulation_and_workers_do_not_change_the_update(ray_cluster, tiny_model_dir, addition_data, tmp_path):
    # SGD: the update is linear in the gradient, so any normalisation slip shows (Adam's
    # first step is nearly sign(g) and would hide it).
    common = ["train.max_steps=2", "train.warmup_ratio=0", "train.scheduler=constant", "train.max_grad_norm=0",
              "train.optimizer=sgd", "train.lr=0.5"]
    layouts = {"mb8": ["train.batch_size=8", "train.grad_accum=1", "cluster.num_workers=1"],
               "mb2ga4": ["train.batch_size=2", "train.grad_accum=4", "cluster.num_workers=1"],
               "mb2ga2w2": ["train.batch_size=2", "train.grad_accum=2", "cluster.num_workers=2"]}
    weights = {}
    for name, layout in layouts.items():
        cfg = _config(tmp_path, tiny_model_dir, addition_data, name, *common, *layout)
        run_training(cfg, echo=lambda *_: None)
        weights[name] = load_file(str(cfg.run_dir / "final" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.allclose(weights["mb8"][key], base[key])
    for name in ("mb2ga4", "mb2ga2w2"):
        for k in weights["mb8"]:
            assert torch.allclose(weights[name][k], weights["mb8"][k], atol=1e-6), (name, k)
