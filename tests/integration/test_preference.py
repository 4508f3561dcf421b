"""Reward models and DPO on 2 Ray CPU workers, on synthetic addition preferences (chosen:
the right sum; rejected: the difference or product). Held-out pairwise accuracy of the
reward model rises from about chance; DPO's final/ prefers the chosen answer more than the
start model does on held-out pairs, judged with plain transformers log-probs, and leaves
its LoRA-disabled reference exactly where it started."""

import json

import pytest
import torch

from cluster.config import load_config
from cluster.train import run_training
from trainers.data import write_synth


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory):
    return write_synth("addition_pref", 800, tmp_path_factory.mktemp("pref") / "pairs.jsonl", seed=5)


@pytest.fixture(scope="module")
def held_out_pairs(preference_data, tmp_path_factory):
    """Pairs whose prompts training never saw (another seed, training prompts removed)."""
    seen = {json.loads(line)["prompt"] for line in preference_data.read_text().splitlines()}
    more = write_synth("addition_pref", 400, tmp_path_factory.mktemp("held_out") / "pairs.jsonl", seed=99)
    pairs = [row for row in map(json.loads, more.read_text().splitlines()) if row["prompt"] not in seen]
    assert len(pairs) >= 48
    return pairs[:48]


def _response_logps(model, tokenizer, pairs, side):
    """Sum of log p(response token) under `model`, for each pair's `side` response after its
    prompt in the chat template: computed here with plain transformers, not by the trainer."""
    out = []
    for pair in pairs:
        prompt = [{"role": "user", "content": pair["prompt"]}]
        start, full = (tokenizer(tokenizer.apply_chat_template(messages, add_generation_prompt=not answer,
                                                               tokenize=False), add_special_tokens=False)["input_ids"]
                       for messages, answer in ((prompt, False),
                                                (prompt + [{"role": "assistant", "content": pair[side]}], True)))
        assert full[:len(start)] == start and len(full) > len(start)
        ids = torch.tensor([full])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        targets = ids[0, 1:]
        out.append(logp[len(start) - 1:].gather(-1, targets[len(start) - 1:, None]).sum().item())
    return torch.tensor(out)


def assert_final_prefers_chosen(final_dir, start_dir, pairs, adapter: bool):
    """Judge DPO by what it is for: on held-out pairs, final/ raises log p(chosen) relative to
    log p(rejected) compared with the start model (the implied reward margin) for most pairs.
    A run that learned the pairs the wrong way round, or learned nothing, fails here."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(final_dir))
    start = AutoModelForCausalLM.from_pretrained(str(start_dir)).eval()
    if adapter:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(start_dir)), str(final_dir))
    else:
        policy = AutoModelForCausalLM.from_pretrained(str(final_dir))
    policy.eval()
    start_gap = _response_logps(start, tokenizer, pairs, "chosen") - _response_logps(start, tokenizer, pairs, "rejected")
    final_gap = _response_logps(policy, tokenizer, pairs, "chosen") - _response_logps(policy, tokenizer, pairs,
                                                                                      "rejected")
    implied = final_gap - start_gap
    assert (implied > 0).float().mean() >= 0.8 and implied.mean() > 1.0, (implied.mean(), (implied > 0).float().mean())
    return implied


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


def test_dpo_lora_prefers_chosen_on_held_out_pairs_and_keeps_reference(ray_cluster, tiny_base_dir, preference_data,
                                                                        held_out_pairs, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    cfg, evals = _run(tmp_path, tiny_base_dir, preference_data, "dpo", "method=dpo", "peft.method=lora",
                      "peft.r=16", "peft.alpha=32", "train.max_steps=30", "train.lr=5e-3", "dpo.beta=0.1")
    first, last = evals[0], evals[-1]
    assert first["eval_reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at start
    assert last["eval_loss"] < first["eval_loss"]
    implied = assert_final_prefers_chosen(cfg.run_dir / "final", tiny_base_dir, held_out_pairs, adapter=True)
    # The trainer's own margin (beta * the implied log-ratio, on its eval split) agrees in sign and size.
    assert 1 / 3 < last["eval_reward_margin"] / (0.1 * implied.mean().item()) < 3, (last, implied.mean())

    policy = AutoPeftModelForCausalLM.from_pretrained(str(cfg.run_dir / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir))
    probe = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad(), policy.disable_adapter():
        assert torch.equal(policy(probe).logits, base(probe).logits)


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_dpo_variants_full_zero2_with_frozen_copy(loss, ray_cluster, tiny_base_dir, preference_data, held_out_pairs,
                                                  tmp_path):
    """Full-parameter DPO sharded with ZeRO-2, the reference a frozen copy, IPO and hinge."""
    beta = {"ipo": 0.5, "hinge": 0.1}[loss]
    cfg, evals = _run(tmp_path, tiny_base_dir, preference_data, f"dpo-{loss}", "method=dpo",
                      "cluster.strategy=zero2", f"dpo.loss={loss}", f"dpo.beta={beta}", "train.max_steps=15",
                      "train.lr=5e-4")
    assert (cfg.run_dir / "checkpoints" / "step_00000015" / "zero").is_dir()
    assert evals[-1]["eval_reward_accuracy"] >= 0.8 and evals[-1]["eval_reward_margin"] > 0, evals[-1]
    assert_final_prefers_chosen(cfg.run_dir / "final", tiny_base_dir, held_out_pairs, adapter=False)
