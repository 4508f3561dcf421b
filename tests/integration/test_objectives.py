"""Objectives beyond chat SFT on 2 Ray workers: classification (accuracy well above
chance, final/ loads as a sequence classifier), continued pre-training on raw text, and
early stopping (stops, final/ is the best model, the summary names its step)."""

import json

import torch

from cluster.config import load_config
from cluster.train import run_training
from trainers.data import write_synth


def _run(tmp_path, model_dir, name, *overrides):
    cfg = load_config(None, [f"model.path={model_dir}", f"output_dir={tmp_path}", f"name={name}",
                             "cluster.num_workers=2", *overrides])
    return cfg, run_training(cfg, echo=lambda *_: None)


def test_classification_beats_chance(ray_cluster, tiny_base_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = write_synth("sentiment", 800, tmp_path / "sentiment.jsonl", seed=3)
    cfg, summary = _run(tmp_path, tiny_base_dir, "cls", "method=classification", f"data.train=[{data}]",
                        "data.max_length=32", "train.batch_size=16", "train.max_steps=60", "train.lr=2e-3",
                        "train.eval_every=20")
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_accuracy"] < 0.7  # untrained head: about chance
    assert evals[-1]["eval_accuracy"] >= 0.8 and evals[-1]["eval_f1"] >= 0.8, evals[-1]

    model = AutoModelForSequenceClassification.from_pretrained(str(cfg.run_dir / "final"))
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.run_dir / "final"))
    assert model.config.id2label == {0: "negative", 1: "positive"}
    batch = tokenizer(["the movie was wonderful", "the movie was dreadful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1).tolist()
    assert [model.config.id2label[i] for i in predicted] == ["positive", "negative"]


def test_cpt_on_raw_text_with_packing(ray_cluster, tiny_model_dir, tmp_path):
    lines = [{"text": f"the number after {n} is {n + 1} and the one before is {n - 1}."} for n in range(400)]
    data = tmp_path / "corpus.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cfg, summary = _run(tmp_path, tiny_model_dir, "cpt", "method=cpt", f"data.train=[{data}]",
                        "data.max_length=128", "data.packing=true", "train.batch_size=4", "train.max_steps=20",
                        "train.lr=2e-3")
    assert summary["final_eval_loss"] < 0.6 * summary["first_eval_loss"], summary


def test_early_stopping_keeps_the_best(ray_cluster, tiny_model_dir, addition_data, tmp_path):
    # A learning rate far too high makes eval loss rise after the first evals.
    cfg, summary = _run(tmp_path, tiny_model_dir, "early", f"data.train=[{addition_data}]", "data.max_length=48",
                        "train.batch_size=8", "train.max_steps=200", "train.lr=3e-2", "train.warmup_ratio=0",
                        "train.scheduler=constant", "train.eval_every=4", "train.early_stopping_patience=2",
                        "train.eval_batches=4")
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    stop = next(r for r in rows if r.get("event") == "early_stop")
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r and r["step"] > 0}
    best_step = min(evals, key=evals.get)
    assert stop["best_step"] == best_step == summary["best_step"]
    assert summary["steps"] < 200 and summary["stopped_early"]
    assert max(evals) - best_step == 8  # stopped after `patience` evaluations without improvement
