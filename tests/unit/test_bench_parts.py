"""The benchmarks' own parts: steady-state arithmetic, the FLOP count, the loss agreement
check, naming processes for memory reports, and that the transformers reference's
padding-free batches keep attention within each sample (else it would do less work than
rayft and look faster)."""

import json

import pytest
import torch

from benchmarks.common import loss_check, steady_state
from benchmarks.sft import FlatPackedCollator, instruction_rows, model_params


def test_steady_state_leaves_out_the_warm_up():
    steps = [{"step": 1, "seconds": 30.0, "tokens": 100, "loss": 9.0},   # start-up
             {"step": 2, "seconds": 1.0, "tokens": 100, "loss": 8.0},
             {"step": 3, "seconds": 2.0, "tokens": 300, "loss": 7.0},
             {"step": 4, "seconds": 1.0, "tokens": 100, "loss": 6.0}]
    out = steady_state(steps, warmup=1)
    assert out["tokens_per_s"] == pytest.approx(500 / 4)
    assert out["step_s_median"] == 1.0 and out["measured_steps"] == 3
    assert out["final_loss"] == pytest.approx(7.0)  # the mean of the last three steps
    with pytest.raises(RuntimeError, match="no steps after"):
        steady_state(steps, warmup=4)


def test_loss_check_flags_sides_that_did_not_learn_alike():
    sides = {"rayft": {"final_loss": 2.0}, "trl": {"final_loss": 2.05}, "transformers": {"final_loss": 2.0}}
    assert loss_check(sides, 0.05)["ok"]
    sides["trl"]["final_loss"] = 2.5
    check = loss_check(sides, 0.05)
    assert not check["ok"] and check["relative_gaps"]["trl"] == pytest.approx(0.2)


def test_model_flops_count_leaves_out_only_the_input_embedding(tiny_model_dir):
    from trainers.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir)
    total = sum(p.numel() for p in model.parameters())
    assert model_params(tiny_model_dir) == total - model.get_input_embeddings().weight.numel()


def test_flat_packed_rows_attend_within_each_sample_only(tiny_model_dir):
    from trainers.data import pack
    from trainers.data.records import Example
    from trainers.models import load_causal_lm

    model = load_causal_lm(tiny_model_dir).eval()
    samples = [Example(list(range(5, 5 + n)), list(range(5, 5 + n))) for n in (7, 4, 9, 3)]
    rows = [{"input_ids": e.input_ids, "labels": e.labels, "seq_lens": e.seq_lens} for e in pack(samples, 12)]
    batch = FlatPackedCollator()(rows)
    assert batch["input_ids"].shape == (1, 23) and "attention_mask" not in batch
    batch.pop("labels")
    with torch.no_grad():
        # use_cache=False as the Trainer sets it (TrainingArguments.use_cache): with a cache,
        # transformers does not look for restarting positions and attends across samples.
        flat = model(**batch, use_cache=False).logits[0]
        start = 0
        for n in [n for row in rows for n in row["seq_lens"]]:
            alone = model(input_ids=batch["input_ids"][:, start:start + n]).logits[0]
            torch.testing.assert_close(flat[start:start + n], alone, atol=1e-4, rtol=1e-4)
            start += n
    assert start == 23


def test_instruction_rows_vary_in_length_and_load_as_chat_data(tmp_path, tiny_model_dir, tiny_tokenizer):
    from trainers.config import DataConfig, DataSource
    from trainers.data import build_datasets

    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in instruction_rows(64, seed=0)))
    examples = build_datasets(DataConfig(train=[DataSource(path=str(path))], eval_fraction=0.0, max_length=256),
                              tiny_tokenizer).train
    lengths = [len(e.input_ids) for e in examples]
    assert len(examples) == 64 and max(lengths) > 3 * min(lengths)
    assert all(any(label != -100 for label in e.labels) for e in examples)


def test_processes_are_named_by_their_ray_or_vllm_title():
    from benchmarks.memory import PeakMemory, role

    assert role("ray::EngineActor.generate") == "ray::EngineActor"
    assert role("VLLM::EngineCore") == "VLLM::EngineCore"
    assert role("/work/.venv/bin/python -m benchmarks all") == "python"
    memory = PeakMemory()  # this process: sampled once, it counts itself
    memory.sample()
    assert memory.total_peak > 50 and memory.peaks("python")
