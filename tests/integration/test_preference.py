"""Reward models and DPO on 2 Ray CPU workers, on synthetic addition preferences (chosen:
the right sum; rejected: the difference or product). Held-out pairwise accuracy of the
reward model rises from about chance; DPO raises the held-out reward accuracy and margin,
and leaves its LoRA-disabled reference exactly where it started."""

import json

import pytest
import torch

from cluster.config import load_config
from cluster.train import run_training
from trainers.data import write_synth


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    return write_synth("addition_pref", 800, tmp_path_factory.mktemp("pref") / "pairs.jsonl", seed=5)


def _run(tmp_path, model_dir, data, name, *overrides):
    cfg = load_config(None, [f"model.path={model_dir}", f"output_dir={tmp_path}", f"name={name}",
                             f"data.train=[{data}]", "data.max_length=48", "cluster.num_workers=2",
                             "train.batch_size=8", "train.eval_every=15", *overrides])
    run_training(cfg, echo=lambda *_: None)
    rows = [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    return cfg, [r for r in rows if "eval_loss" in r]


def test_reward_model_learns_preferences(ray_cluster, tiny_base_dir, preference_data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg, evals = _run(tmp_path, tiny_base_dir, preference_data, "rm", "method=rm", "train.max_steps=45",
                      "train.lr=1e-3")
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and 0.2 < first["eval_accuracy"] < 0.8  # an untrained head: about chance
    assert last["eval_accuracy"] >= 0.85 and last["eval_margin"] > first["eval_margin"] + 1.0, last

    model = AutoModelForSequenceClassification.from_pretrained(str(cfg.run_dir / "final"))
    tokenizer = AutoTokenizer.from_pretrained(str(cfg.run_dir / "final"))
    assert model.config.num_labels == 1

    def reward(answer):
        text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 31 + 44?"},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        with torch.no_grad():
            return model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item()

    assert reward("75") > reward("-13") and reward("75") > reward("1364")


def test_dpo_lora_raises_reward_accuracy_and_keeps_reference(ray_cluster, tiny_base_dir, preference_data, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    cfg, evals = _run(tmp_path, tiny_base_dir, preference_data, "dpo", "method=dpo", "peft.method=lora",
                      "peft.r=16", "peft.alpha=32", "train.max_steps=30", "train.lr=5e-3", "dpo.beta=0.1")
    first, last = evals[0], evals[-1]
    assert first["eval_reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at start
    assert last["eval_reward_accuracy"] >= 0.8 and last["eval_reward_margin"] > 0.5, last
    assert last["eval_loss"] < first["eval_loss"]

    policy = AutoPeftModelForCausalLM.from_pretrained(str(cfg.run_dir / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir))
    probe = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad(), policy.disable_adapter():
        assert torch.equal(policy(probe).logits, base(probe).logits)


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_dpo_variants_full_zero2_with_frozen_copy(loss, ray_cluster, tiny_base_dir, preference_data, tmp_path):
    """Full-parameter DPO sharded with ZeRO-2, the reference a frozen copy, IPO and hinge."""
    beta = {"ipo": 0.5, "hinge": 0.1}[loss]
    cfg, evals = _run(tmp_path, tiny_base_dir, preference_data, f"dpo-{loss}", "method=dpo",
                      "cluster.strategy=zero2", f"dpo.loss={loss}", f"dpo.beta={beta}", "train.max_steps=15",
                      "train.lr=5e-4")
    assert (cfg.run_dir / "checkpoints" / "step_00000015" / "zero").is_dir()
    assert evals[-1]["eval_reward_accuracy"] >= 0.8 and evals[-1]["eval_reward_margin"] > 0, evals[-1]
