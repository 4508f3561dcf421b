"""Eval metrics by hand, the rule that picks them, reading eval data, telling model
directories apart, and the loss and generation passes against transformers' own."""

import json
import math

import pytest
import torch

from cluster.evaluate import EvalOptions, evaluate, format_report, to_json
from cluster.evaluate.data import label_ids, load_eval_data
from cluster.evaluate.metrics import (CLASSIFICATION, EXACT_MATCH, LOSS, accuracy, choose_passes, f1_per_label,
                                      macro_f1, mean_loss, perplexity)
from cluster.evaluate.target import CAUSAL_LM, CLASSIFIER, inspect_model
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
])
def test_choose_passes(task, fmt, has_reference, passes):
    assert choose_passes(task, fmt, has_reference) == passes


@pytest.mark.parametrize("task, fmt, message", [
    ("causal_lm", "prompt", "without a 'reference'"),
    ("causal_lm", "classification", "classification model"),
    ("causal_lm", "preference", "cannot evaluate a causal LM"),
    ("classifier", "chat", "needs text/label rows"),
])
def test_choose_passes_refuses_mismatches(task, fmt, message):
    with pytest.raises(UserError, match=message):
        choose_passes(task, fmt, has_reference=False)


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
    assert 0.0 <= report["exact_match"] <= 1.0 and "exact match" in format_report(report)


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
