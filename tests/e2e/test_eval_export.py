"""`rayft eval` and `rayft export` as a user runs them: real subprocesses on a tiny model
from `init-model`, data from `data synth`, a LoRA run directory, a classifier, and reward
models (a full one-output classifier and a SEQ_CLS LoRA run) checked against rewards
computed here by direct forward passes."""

import json
from pathlib import Path

import pytest
import torch

from tests.e2e.cli import ROOT, assert_one_line_error, rayft


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """models/tiny, data/addition.jsonl and runs/lora (final/ = a LoRA adapter whose
    lora_B is random, so the adapter changes the model, as a trained one would)."""
    from peft import LoraConfig, get_peft_model

    from trainers.models import load_causal_lm, load_tokenizer

    ws = tmp_path_factory.mktemp("eval_ws")
    rayft("init-model", "--preset", "tiny", "--out", ws / "models/tiny", cwd=ws)
    rayft("data", "synth", "--task", "addition", "--n", "16", "--out", "data/addition.jsonl", cwd=ws)
    model = get_peft_model(load_causal_lm(ws / "models/tiny"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    final = ws / "runs/lora/final"
    model.save_pretrained(final)
    load_tokenizer(ws / "models/tiny").save_pretrained(final)
    (ws / "runs/lora/config.yaml").write_text("name: lora\ndata:\n  max_length: 64\n")
    return ws


def eval_json(ws, target, *extra):
    return json.loads(rayft("eval", target, "--data", "data/addition.jsonl", "--json", "--max-new-tokens", "4",
                            *extra, cwd=ws).stdout)


def test_eval_full_model(ws):
    import math

    from trainers.models import load_tokenizer

    report = eval_json(ws, "models/tiny", "--out", "out/samples.jsonl", "--batch-size", "16")
    samples = [json.loads(line) for line in (ws / "out/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 16 and report["task"] == "causal_lm" and report["samples"] == 16
    assert {"prompt", "reference", "generation", "correct", "loss"} <= samples[0].keys()
    # The report's loss is the per-token mean over the rows' own losses...
    assert report["tokens"] == sum(s["tokens"] for s in samples) and min(s["tokens"] for s in samples) >= 1
    per_token = sum(s["loss"] * s["tokens"] for s in samples) / report["tokens"]
    assert report["loss"] == pytest.approx(per_token, rel=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-6)
    # ...and a random model is about uniform over its vocabulary: loss ~ ln(vocab size).
    assert abs(report["loss"] - math.log(len(load_tokenizer(ws / "models/tiny")))) < 1.0, report["loss"]
    # Exact match: each row's generation against its reference, and their mean.
    assert all(s["correct"] == (s["generation"].strip() == s["reference"].strip()) for s in samples)
    assert report["exact_match_samples"] == 16
    assert report["exact_match"] == sum(s["correct"] for s in samples) / 16


def test_export_merge_lora_equals_adapter(ws):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from trainers.models import load_causal_lm

    adapter = eval_json(ws, "runs/lora")  # a run directory: its final/ is evaluated
    assert adapter["peft"] == "LORA" and adapter["max_length"] == 64  # taken from the run's config.yaml
    out = rayft("export", "runs/lora", "--out", "exported/merged", "--merge-lora", cwd=ws).stdout
    assert "merged the lora adapter" in out and not (ws / "exported/merged.tmp").exists()
    merged_dir = ws / "exported/merged"
    assert not (merged_dir / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    peft_model = PeftModel.from_pretrained(load_causal_lm(ws / "models/tiny"), ws / "runs/lora/final").eval()
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
        base = load_causal_lm(ws / "models/tiny")(input_ids=ids).logits
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter is not a no-op
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    merged_report = eval_json(ws, "exported/merged", "--max-length", "64")
    assert merged_report["peft"] is None
    assert merged_report["loss"] == pytest.approx(adapter["loss"], abs=1e-4)
    again = rayft("export", "runs/lora", "--out", "exported/merged", "--merge-lora", cwd=ws, check=False)
    assert_one_line_error(again, "not empty", "--force")


def _snapshot(root: Path) -> dict:
    """Every file under `root` with its content hash, and every folder: what a refused
    export must leave exactly as it was."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("out", ["runs/lora", "runs", "runs/lora/final", "runs/lora/final/sub", "runs/lora/exported",
                                 "models/tiny", "models", "link-to-run", "runs/lora/final.old"])
def test_export_never_writes_over_what_it_reads(ws, out):
    """An --out that is, holds or lies inside the model, the run named, or the adapter's
    base (also through a symlink) is refused with --force too, before anything is touched."""
    run = ws / "runs/lora"
    (run / "checkpoints/step_00000010").mkdir(parents=True, exist_ok=True)
    (run / "checkpoints/step_00000010/trainable.safetensors").write_bytes(b"weights")
    (run / "metrics.jsonl").write_text('{"step": 10, "loss": 1.0}\n')
    if not (ws / "link-to-run").exists():
        (ws / "link-to-run").symlink_to(run)
    before = _snapshot(ws)
    proc = rayft("export", "runs/lora", "--out", out, "--force", cwd=ws, check=False)
    assert_one_line_error(proc, f"--out {out}", "choose an --out outside it")
    assert _snapshot(ws) == before


def test_export_with_force_replaces_an_old_export_whole(ws):
    rayft("export", "runs/lora", "--out", "exported/adapter", cwd=ws)
    (ws / "exported/adapter/stale.txt").write_text("from an older export")
    rayft("export", "runs/lora", "--out", "exported/adapter", "--force", cwd=ws)
    adapter = ws / "exported/adapter"
    assert not (adapter / "stale.txt").exists()
    assert (adapter / "adapter_model.safetensors").read_bytes() == (
        ws / "runs/lora/final/adapter_model.safetensors").read_bytes()
    assert sorted(p.name for p in adapter.parent.iterdir() if p.name.startswith("adapter")) == ["adapter"]


def test_missing_path_exits_2_with_one_line(ws):
    assert_one_line_error(rayft("eval", "runs/nope", "--data", "data/addition.jsonl", cwd=ws, check=False),
                          "runs/nope", "not found")
    assert_one_line_error(rayft("export", "runs/nope", "--out", "x", cwd=ws, check=False), "runs/nope")


def test_eval_classifier_accuracy_f1_and_unknown_label(ws):
    from transformers import AutoConfig, LlamaForSequenceClassification

    from trainers.models import load_tokenizer

    labels = {0: "negative", 1: "positive"}
    config = AutoConfig.from_pretrained(ws / "models/tiny", num_labels=2, id2label=labels,
                                        label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(ws / "models/cls")
    load_tokenizer(ws / "models/tiny").save_pretrained(ws / "models/cls")
    rows = [("a great movie", "positive"), ("terrible, I hate it", "negative"), ("love it", "positive"),
            ("bad", "negative"), ("fine", 1)]
    (ws / "data/reviews.jsonl").write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    # The readable table this time (the causal LM tests read --json): `name  value` lines.
    table = rayft("eval", "models/cls", "--data", "data/reviews.jsonl", cwd=ws).stdout
    fields = dict(line.split("  ", 1) for line in table.splitlines())
    assert fields["task"].strip() == "classifier" and "5 rows" in fields["data"]
    # The same numbers by hand: direct forward passes (the head reads the last token, eos).
    tokenizer = load_tokenizer(ws / "models/cls")
    model = LlamaForSequenceClassification.from_pretrained(ws / "models/cls").eval()
    gold = [labels[lab] if isinstance(lab, int) else lab for _, lab in rows]
    with torch.no_grad():
        predicted = [labels[model(input_ids=torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]
                                                          + [tokenizer.eos_token_id]])).logits.argmax(-1).item()]
                     for t, _ in rows]
    f1 = {}
    for name in labels.values():
        tp = sum(g == p == name for g, p in zip(gold, predicted))
        fp = sum(p == name != g for g, p in zip(gold, predicted))
        fn = sum(g == name != p for g, p in zip(gold, predicted))
        if tp + fp + fn:
            f1[name] = 2 * tp / (2 * tp + fp + fn)
    accuracy = sum(g == p for g, p in zip(gold, predicted)) / len(rows)
    assert float(fields["accuracy"].split()[0]) == pytest.approx(accuracy, abs=1e-4)
    assert float(fields["macro F1"].split()[0]) == pytest.approx(sum(f1.values()) / len(f1), abs=1e-4)
    assert {name for name in fields if name.startswith("F1 ")} == {f"F1 {name}" for name in f1}

    bad = [{"text": "ok", "label": "positive"}, {"text": "meh", "label": "neutral"}]
    (ws / "data/bad_reviews.jsonl").write_text("".join(json.dumps(row) + "\n" for row in bad))
    proc = rayft("eval", "models/cls", "--data", "data/bad_reviews.jsonl", cwd=ws, check=False)
    assert_one_line_error(proc, "bad_reviews.jsonl:2", "'label'", "neutral")


def test_help_for_eval_and_export():
    for command in ("eval", "export"):
        assert "usage:" in rayft(command, "--help", cwd=ROOT).stdout


@pytest.fixture(scope="module")
def rm_ws(ws):
    """models/rm (a full one-output classifier, id2label {0: "reward"}), runs/rm-lora (its
    final/ a SEQ_CLS LoRA adapter on models/tiny with config.json beside it, as the reward
    trainer saves it; the run config sets rm.center_coef), data/pairs.jsonl (addition_pref)
    and data/scored.jsonl (each pair's sides, scored 1 and 0)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaForSequenceClassification

    from trainers.data import write_synth
    from trainers.models import load_tokenizer

    tokenizer = load_tokenizer(ws / "models/tiny")
    reward = {"num_labels": 1, "id2label": {0: "reward"}, "label2id": {"reward": 0}}
    torch.manual_seed(1)
    LlamaForSequenceClassification(AutoConfig.from_pretrained(ws / "models/tiny", **reward)).save_pretrained(
        ws / "models/rm")
    tokenizer.save_pretrained(ws / "models/rm")
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(ws / "models/tiny", **reward),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(std=0.05)
    final = ws / "runs/rm-lora/final"
    model.save_pretrained(final)
    model.config.save_pretrained(final)
    tokenizer.save_pretrained(final)
    (ws / "runs/rm-lora/config.yaml").write_text("name: rm-lora\nmethod: rm\ndata:\n  max_length: 128\n"
                                                 "rm:\n  center_coef: 0.01\n")
    pairs = [json.loads(line) for line in write_synth("addition_pref", 12, ws / "data/pairs.jsonl").open()]
    scored = [{"prompt": p["prompt"], "response": p[side], "score": float(side == "chosen")}
              for p in pairs for side in ("chosen", "rejected")]
    (ws / "data/scored.jsonl").write_text("".join(json.dumps(row) + "\n" for row in scored))
    return ws


def load_rm(ws, target):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from trainers.models import load_tokenizer

    if target == "models/rm":
        return AutoModelForSequenceClassification.from_pretrained(ws / target).eval(), load_tokenizer(ws / target)
    base = AutoModelForSequenceClassification.from_pretrained(ws / "models/tiny", num_labels=1)
    final = ws / target / "final"
    return PeftModel.from_pretrained(base, final).eval(), load_tokenizer(final)


def direct_pair_rewards(ws, target, max_length):
    """(chosen, rejected) rewards of data/pairs.jsonl, one unpadded sequence at a time."""
    from trainers.data import load_records
    from trainers.data.pairs import encode_pairs

    model, tokenizer = load_rm(ws, target)
    pairs, dropped = encode_pairs(load_records(ws / "data/pairs.jsonl", purpose="preference").records, tokenizer,
                                  max_length, "right")
    assert dropped == 0
    with torch.no_grad():
        sides = [[model(input_ids=torch.tensor([getattr(p, side).input_ids])).logits[0, 0].item() for p in pairs]
                 for side in ("chosen", "rejected")]
    return torch.tensor(sides[0]), torch.tensor(sides[1])


@pytest.mark.parametrize("target, max_length, center_coef", [("models/rm", 512, 0.0), ("runs/rm-lora", 128, 0.01)])
def test_eval_reward_model_on_pairs_matches_direct_rewards(rm_ws, target, max_length, center_coef):
    from trainers.losses import pairwise_reward_loss

    out = f"out/{target.replace('/', '_')}_pairs.jsonl"
    report = json.loads(rayft("eval", target, "--data", "data/pairs.jsonl", "--json", "--batch-size", "5",
                              "--out", out, cwd=rm_ws).stdout)
    chosen, rejected = direct_pair_rewards(rm_ws, target, max_length)
    assert report["task"] == "reward_model" and report["max_length"] == max_length
    assert report["peft"] == (None if target == "models/rm" else "LORA")
    assert (report["samples"], report["pairs"], report["dropped"]) == (12, 12, 0)
    assert report["accuracy"] == pytest.approx((chosen > rejected).float().mean().item())
    assert report["margin"] == pytest.approx((chosen - rejected).mean().item(), abs=1e-5)
    assert report["chosen_reward"] == pytest.approx(chosen.mean().item(), abs=1e-5)
    assert report["rejected_reward"] == pytest.approx(rejected.mean().item(), abs=1e-5)
    # The run's rm.center_coef is part of the loss it reported, so eval takes it too.
    expected_loss = pairwise_reward_loss(chosen, rejected, center_coef=center_coef).mean().item()
    assert report["loss"] == pytest.approx(expected_loss, abs=1e-5)
    rows = [json.loads(line) for line in (rm_ws / out).read_text().splitlines()]
    assert [row["origin"] for row in rows] == [f"data/pairs.jsonl:{i}" for i in range(1, 13)]
    assert [row["chosen_reward"] for row in rows] == pytest.approx(chosen.tolist(), abs=1e-5)
    assert [row["rejected_reward"] for row in rows] == pytest.approx(rejected.tolist(), abs=1e-5)
    assert [row["correct"] for row in rows] == (chosen > rejected).tolist()
    assert {"prompt", "chosen", "rejected"} <= rows[0].keys()


def test_eval_reward_adapter_scores_rows_like_a_direct_forward_pass(rm_ws):
    from trainers.data import encode, load_records
    from trainers.data.records import Conversation

    proc = rayft("eval", "runs/rm-lora", "--data", "data/scored.jsonl", "--json", "--out", "out/scores.jsonl",
                 cwd=rm_ws)
    report = json.loads(proc.stdout)
    rows = [json.loads(line) for line in (rm_ws / "out/scores.jsonl").read_text().splitlines()]
    records = load_records(rm_ws / "data/scored.jsonl", purpose="scored").records
    assert report["format"] == "scored" and report["scored"] == len(rows) == len(records) == 24
    model, tokenizer = load_rm(rm_ws, "runs/rm-lora")
    expected = []
    for record in records:
        messages = [*record.prompt_messages, {"role": "assistant", "content": record.response}]
        ids = encode(Conversation(messages), tokenizer, 128).input_ids
        with torch.no_grad():
            expected.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    assert all(torch.isfinite(torch.tensor([row["reward"] for row in rows])))
    assert [row["reward"] for row in rows] == pytest.approx(expected, abs=1e-5)
    assert [(row["response"], row["score"]) for row in rows] == [(r.response, r.score) for r in records]
    scores = torch.tensor([r.score for r in records])
    assert report["mse"] == pytest.approx(((torch.tensor(expected) - scores) ** 2).mean().item(), abs=1e-5)
    assert report["mae"] == pytest.approx((torch.tensor(expected) - scores).abs().mean().item(), abs=1e-5)


def test_eval_reward_model_on_the_wrong_kind_of_rows_exits_2(rm_ws):
    (rm_ws / "data/labels.jsonl").write_text(json.dumps({"text": "good", "label": "positive"}) + "\n")
    proc = rayft("eval", "models/rm", "--data", "data/labels.jsonl", cwd=rm_ws, check=False)
    assert_one_line_error(proc, "reward model needs preference rows", "'classification'")
