"""Eval metrics by hand, the rule that picks them, reading eval data, telling model
directories apart (reward models included), the loss and generation passes against
transformers' own, and reward-model scoring against a direct forward pass."""

import json
import math

import pytest
import torch

from cluster.evaluate import EvalOptions, evaluate, format_report, run_reward_config, to_json
from cluster.evaluate.data import label_ids, load_eval_data
from cluster.evaluate.metrics import (CLASSIFICATION, EXACT_MATCH, LOSS, PAIRS, REWARDS, accuracy, choose_passes,
                                      f1_per_label, macro_f1, mean_loss, pairwise_metrics, perplexity,
                                      regression_errors)
from cluster.evaluate.target import CAUSAL_LM, CLASSIFIER, REWARD_MODEL, inspect_model, safetensors_shapes
from cluster.export import export
from trainers.data.records import Labelled
from trainers.errors import DataError, UserError


def test_macro_f1_by_hand():
    gold = ["a", "a", "a", "b", "b", "c"]
    pred = ["a", "a", "b", "b", "c", "c"]
    # a: tp 2 fp 0 fn 1 -> P 1, R 2/3, F1 0.8;  b: tp 1 fp 1 fn 1 -> 0.5;  c: tp 1 fp 1 fn 0 -> P .5 R 1 -> 2/3
    assert f1_per_label(gold, pred) == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3})
    assert macro_f1(gold, pred) == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    assert accuracy(gold, pred) == pytest.approx(4 / 6)


def test_macro_f1_counts_labels_seen_only_in_predictions():
    # b is never gold but is predicted once: its F1 is 0 and it halves the macro mean.
    assert f1_per_label(["a", "a"], ["a", "b"]) == pytest.approx({"a": 2 / 3, "b": 0.0})
    assert macro_f1(["a", "a"], ["a", "b"]) == pytest.approx(1 / 3)
    assert macro_f1(["x", "y"], ["x", "y"]) == 1.0
    with pytest.raises(ValueError):
        macro_f1(["a"], ["a", "b"])


def test_loss_and_perplexity():
    assert mean_loss(6 * math.log(2), 6) == pytest.approx(math.log(2))
    assert perplexity(math.log(2)) == pytest.approx(2.0)  # two equally likely tokens
    assert perplexity(0.0) == 1.0
    assert perplexity(1e6) == math.inf
    assert math.isnan(mean_loss(0.0, 0))
    assert json.loads(to_json({"loss": float("nan"), "p": [float("inf")]})) == {"loss": None, "p": [None]}


@pytest.mark.parametrize("task, fmt, has_reference, passes", [
    ("causal_lm", "chat", True, (LOSS, EXACT_MATCH)),
    ("causal_lm", "chat", False, (LOSS,)),
    ("causal_lm", "alpaca", False, (LOSS,)),
    ("causal_lm", "text", False, (LOSS,)),
    ("causal_lm", "text", True, (LOSS,)),          # raw text has no prompt to generate from
    ("causal_lm", "prompt", True, (EXACT_MATCH,)),
    ("classifier", "classification", False, (CLASSIFICATION,)),
    ("reward_model", "preference", False, (PAIRS,)),
    ("reward_model", "scored", False, (REWARDS,)),
    ("reward_model", "completion", False, (REWARDS,)),   # prompt/completion: score the completion
    ("reward_model", "chat", True, (REWARDS,)),          # the final assistant turn is the response
])
def test_choose_passes(task, fmt, has_reference, passes):
    assert choose_passes(task, fmt, has_reference) == passes


@pytest.mark.parametrize("task, fmt, message", [
    ("causal_lm", "prompt", "without a 'reference'"),
    ("causal_lm", "classification", "classification model"),
    ("causal_lm", "preference", "cannot evaluate a causal LM"),
    ("classifier", "chat", "needs text/label rows"),
    ("classifier", "preference", "needs text/label rows"),
    ("reward_model", "prompt", "no response for a reward model"),
    ("reward_model", "classification", "reward model needs preference rows"),
    ("reward_model", "text", "reward model needs preference rows"),
])
def test_choose_passes_refuses_mismatches(task, fmt, message):
    with pytest.raises(UserError, match=message):
        choose_passes(task, fmt, has_reference=False)


def test_pairwise_metrics_and_regression_errors_by_hand():
    # pairs: +1 (right), -0.5 (wrong), 0 (a tie: wrong, as in training)
    got = pairwise_metrics([2.0, 0.0, 1.0], [1.0, 0.5, 1.0])
    assert got == pytest.approx({"accuracy": 1 / 3, "margin": 0.5 / 3, "chosen_reward": 1.0,
                                 "rejected_reward": 2.5 / 3})
    assert all(math.isnan(v) for v in pairwise_metrics([], []).values())
    with pytest.raises(ValueError):
        pairwise_metrics([1.0], [])
    # errors 1, -2, 0.5 -> squared 1, 4, .25; absolute 1, 2, .5
    assert regression_errors([1.0, -1.0, 0.5], [0.0, 1.0, 0.0]) == pytest.approx({"mse": 5.25 / 3, "mae": 3.5 / 3})


def test_run_reward_config_reads_only_valid_rm_keys():
    assert run_reward_config({}) == {}
    assert run_reward_config({"rm": {"use_margin": False, "center_coef": 0.01}}) == {"use_margin": False,
                                                                                     "center_coef": 0.01}
    assert run_reward_config({"rm": {"use_margin": "yes", "center_coef": -1}}) == {}
    assert run_reward_config({"rm": "pairwise"}) == {}


def test_format_report_for_a_reward_model():
    base = {"model": "runs/rm/final", "task": "reward_model", "peft": None, "base": None, "data": "d.jsonl",
            "samples": 3, "truncated": 0, "dropped": 1}
    pairs = format_report({**base, "format": "preference", "accuracy": 0.5, "margin": 0.25, "chosen_reward": 1.0,
                           "rejected_reward": 0.75, "loss": float("nan"), "pairs": 2})
    fields = {name: value.strip() for name, value in (line.split("  ", 1) for line in pairs.splitlines())}
    assert fields["task"] == "reward model" and fields["accuracy"].startswith("0.5000")
    assert "2 pairs; 1 dropped" in fields["accuracy"] and fields["loss"].startswith("n/a")
    scores = format_report({**base, "format": "scored", "mean_reward": 0.1, "scored": 2, "mse": 0.5, "mae": 0.25})
    assert "MSE" in scores and "MAE" in scores and "accuracy" not in scores
    assert "MSE" not in format_report({**base, "format": "completion", "mean_reward": 0.1, "scored": 2})


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(question, reply, **extra):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], **extra}


def test_exact_match_only_on_rows_with_an_explicit_reference(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [chat("1+1?", "2", reference="2"), chat("hi", "hello"),
                                           chat("2+2?", "four", answer=4)])
    data = load_eval_data(f, CAUSAL_LM)
    assert data.passes == (LOSS, EXACT_MATCH) and data.rows == 3 and len(data.scored) == 3
    assert {i: p.reference for i, p in data.prompts.items()} == {0: "2", 2: "4"}
    assert data.origins == [f"{f}:1", f"{f}:2", f"{f}:3"]
    assert load_eval_data(f, CAUSAL_LM, limit=2).prompts.keys() == {0}
    plain = write_jsonl(tmp_path / "plain.jsonl", [chat("hi", "hello")])
    assert load_eval_data(plain, CAUSAL_LM).passes == (LOSS,)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    data = load_eval_data(prompts, CAUSAL_LM)
    assert data.passes == (EXACT_MATCH,) and data.scored is None and data.rows == 1


def test_eval_data_errors_name_file_line_field(tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [chat("a", "b", reference="b"), chat("c", "d", reference=["x"])])
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'reference'"):
        load_eval_data(f, CAUSAL_LM)
    with pytest.raises(UserError, match="not found"):
        load_eval_data(tmp_path / "missing.jsonl", CAUSAL_LM)


def test_reward_model_data_pairs_scored_and_unscored_rows(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "1+1?", "chosen": "2", "rejected": "3"},
                                                   {"prompt": "2+2?", "chosen": "4", "rejected": "5", "margin": 1}])
    data = load_eval_data(pairs, REWARD_MODEL)
    assert data.passes == (PAIRS,) and [p.chosen for p in data.pairs] == ["2", "4"] and data.pairs[1].margin == 1
    assert data.origins == [f"{pairs}:1", f"{pairs}:2"] and load_eval_data(pairs, REWARD_MODEL, limit=1).rows == 1
    scored = write_jsonl(tmp_path / "scored.jsonl", [{"input": "hi", "output": "hello", "reward_score": 0.5}])
    data = load_eval_data(scored, REWARD_MODEL)
    assert data.passes == (REWARDS,) and data.has_scores and data.responses[0].score == 0.5
    # Rows without a score: any conversation ending in an assistant turn, system prompt kept.
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"prompt": "hi", "completion": "hello"}])
    data = load_eval_data(chats, REWARD_MODEL)
    assert not data.has_scores and data.responses[0].prompt_messages == [{"role": "user", "content": "hi"}]
    chats = write_jsonl(tmp_path / "sys.jsonl", [chat("q", "a", system="be brief")])
    response = load_eval_data(chats, REWARD_MODEL).responses[0]
    assert response.prompt_messages[0] == {"role": "system", "content": "be brief"} and response.response == "a"
    # prompt/response without a score is not a known row kind: it reads as a prompt.
    with pytest.raises(UserError, match="no response for a reward model"):
        load_eval_data(write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "hi", "response": "hello"}]), REWARD_MODEL)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "chosen": "b", "rejected": "c"},
                                               {"prompt": "a", "chosen": "b", "rejected": 3}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'rejected'"):
        load_eval_data(bad, REWARD_MODEL)


def test_label_ids_by_name_or_integer_id():
    id2label = {0: "neg", 1: "pos"}
    rows = [Labelled("x", "pos", "f.jsonl:1"), Labelled("y", "0", "f.jsonl:2")]
    assert label_ids(rows, id2label) == [1, 0]
    with pytest.raises(DataError, match=r"^f.jsonl:3: field 'label': unknown label 'meh'") as err:
        label_ids(rows + [Labelled("z", "meh", "f.jsonl:3")], id2label)
    assert (err.value.path, err.value.line, err.value.field) == ("f.jsonl", 3, "label")
    # A SEQ_CLS adapter saved without label names: integer ids work, names get a hint.
    generic = {0: "LABEL_0", 1: "LABEL_1"}
    assert label_ids([Labelled("x", "1", "f.jsonl:1")], generic) == [1]
    with pytest.raises(DataError, match="saved no label names"):
        label_ids(rows, generic)


def test_inspect_model_tells_directories_apart(tmp_path):
    with pytest.raises(UserError, match="not found"):
        inspect_model(tmp_path / "nope")
    run = tmp_path / "run"
    (run / "checkpoints/step_00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("name: run\n")
    with pytest.raises(UserError, match="run directory without final"):
        inspect_model(run)
    (run / "checkpoints/step_00000002/trainable.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="resumable training checkpoint"):
        inspect_model(run / "checkpoints/step_00000002")
    (run / "final").mkdir()
    (run / "final/config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    md = inspect_model(run)
    assert md.path == run / "final" and md.task == CLASSIFIER and md.peft_type is None
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM",
                                                             "base_model_name_or_path": str(tmp_path / "gone")}))
    with pytest.raises(UserError, match="base model .*gone is not a directory"):
        inspect_model(adapter)
    with pytest.raises(UserError, match="not a model directory"):
        inspect_model(tmp_path / "run/checkpoints")


def test_inspect_model_tells_reward_models_from_classifiers(tmp_path):
    from safetensors.torch import save_file

    full = tmp_path / "rm"
    full.mkdir()
    (full / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"],
                                                  "id2label": {"0": "reward"}}))
    assert inspect_model(full).task == REWARD_MODEL
    (full / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    assert inspect_model(full).task == CLASSIFIER  # transformers leaves out its default: two labels
    # A SEQ_CLS adapter without config.json: the head's size in the safetensors header decides.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "SEQ_CLS",
                                                             "base_model_name_or_path": str(full)}))
    save_file({"base_model.model.score.weight": torch.zeros(1, 4), "x.lora_A.weight": torch.zeros(2, 4)},
              str(adapter / "adapter_model.safetensors"))
    assert safetensors_shapes(adapter / "adapter_model.safetensors")["base_model.model.score.weight"] == [1, 4]
    md = inspect_model(adapter)
    assert (md.task, md.peft_type, md.base) == (REWARD_MODEL, "LORA", full)
    (adapter / "config.json").write_text(json.dumps({"id2label": {"0": "neg", "1": "pos"}}))
    assert inspect_model(adapter).task == CLASSIFIER
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{oops")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        safetensors_shapes(tmp_path / "junk.safetensors")


def test_loss_matches_transformers_and_generation_is_batch_invariant(tiny_model_dir, tmp_path):
    from cluster.evaluate.passes import generate
    from trainers.data import encode, encode_prompt, load_records
    from trainers.models import load_causal_lm, load_tokenizer

    f = write_jsonl(tmp_path / "d.jsonl", [chat("What is 12 + 30?", "42", reference="42"),
                                           chat("Reverse: abc, and tell me more", "cba", reference="cba")])
    report, samples = evaluate(tiny_model_dir, f, EvalOptions(batch_size=2, max_new_tokens=3))
    model, tokenizer = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    for record, sample in zip(load_records(f).records, samples):
        example = encode(record, tokenizer, 512)
        with torch.no_grad():
            hf_loss = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels])).loss
        assert sample["loss"] == pytest.approx(hf_loss.item(), abs=1e-5)
    total = sum(s["loss"] * s["tokens"] for s in samples)
    assert report["loss"] == pytest.approx(total / report["tokens"]) and report["perplexity"] == pytest.approx(
        math.exp(report["loss"]))
    prompts = [encode_prompt(p.prompt_messages, tokenizer) for p in load_records(f, purpose="prompt").records]
    assert generate(model, tokenizer, prompts, 5, "cpu") == [generate(model, tokenizer, [p], 5, "cpu")[0]
                                                              for p in prompts]
    assert [s["generation"] for s in samples] == generate(model, tokenizer, prompts, 3, "cpu")
    expected = [s["generation"].strip() == ref for s, ref in zip(samples, ["42", "cba"])]
    assert [s["correct"] for s in samples] == expected and report["exact_match"] == sum(expected) / 2
    assert f"{report['exact_match']:.4f}  ({sum(expected)} of 2 rows" in format_report(report)


def test_reward_model_scores_unscored_rows_like_a_forward_pass_and_exports(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaForSequenceClassification

    from trainers.data import encode, load_records
    from trainers.models import load_tokenizer

    reward = {"num_labels": 1, "id2label": {0: "reward"}, "label2id": {"reward": 0}}
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(AutoConfig.from_pretrained(tiny_model_dir, **reward)).eval()
    model.save_pretrained(tmp_path / "rm")
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.save_pretrained(tmp_path / "rm")
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "What is 2 + 2?", "completion": "4"},
                                           {"prompt": "Hi", "completion": "Hello there"},
                                           {"prompt": "Say a long thing", "completion": "word " * 30}])
    report, samples = evaluate(tmp_path / "rm", f, EvalOptions(batch_size=2))
    assert report["task"] == REWARD_MODEL and report["scored"] == 3 and "mse" not in report
    with torch.no_grad():
        expected = [model(input_ids=torch.tensor([encode(r, tokenizer, 512).input_ids])).logits[0, 0].item()
                    for r in load_records(f).records]
    assert [s["reward"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert samples[1]["response"] == "Hello there" and "score" not in samples[1]
    assert "mean reward" in format_report(report)

    # A reward adapter merged by `rayft export` stays a reward model.
    lora = get_peft_model(AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, **reward),
                          LoraConfig(r=2, target_modules=["q_proj"], task_type="SEQ_CLS"))
    lora.save_pretrained(tmp_path / "adapter")
    assert inspect_model(tmp_path / "adapter").task == REWARD_MODEL  # from the head's shape alone
    lora.config.save_pretrained(tmp_path / "adapter")  # the label names, as the reward trainer keeps them
    export(tmp_path / "adapter", tmp_path / "merged", merge_lora=True)
    assert inspect_model(tmp_path / "merged").task == REWARD_MODEL
    assert json.loads((tmp_path / "merged/config.json").read_text())["id2label"] == {"0": "reward"}


def test_export_refuses_unmergeable_adapters_and_overwrites(tiny_model_dir, tmp_path):
    from peft import PrefixTuningConfig, get_peft_model

    from trainers.models import load_causal_lm

    prefix = tmp_path / "prefix"
    get_peft_model(load_causal_lm(tiny_model_dir),
                   PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM")).save_pretrained(prefix)
    with pytest.raises(UserError, match="prefix_tuning adapter .* cannot be merged"):
        export(prefix, tmp_path / "out", merge_lora=True)
    assert "copied the prefix_tuning adapter" in export(prefix, tmp_path / "out")
    assert (tmp_path / "out/adapter_config.json").is_file() and not (tmp_path / "out.tmp").exists()
    with pytest.raises(UserError, match="not empty .*--force"):
        export(prefix, tmp_path / "out")
    with pytest.raises(UserError, match="is the model being exported"):
        export(prefix, prefix, force=True)
