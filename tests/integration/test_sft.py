"""SFT on 2 Ray Train workers (gloo DDP): eval loss falls; LoRA output reloads in peft and
generates; full fine-tuning output reloads in transformers with the trained weights."""

import json

import torch

from cluster.config import load_config
from cluster.train import run_training
from trainers.checkpoint import checkpoint_complete


def _config(tmp_path, model_dir, data, name, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data}]", "data.max_length=48",
        f"output_dir={tmp_path}", f"name={name}", "train.batch_size=8", "train.max_steps=30",
        "train.eval_every=10", "train.save_every=15", "train.warmup_ratio=0.1",
        "cluster.num_workers=2", *extra])


def _assert_run_dir(run_dir):
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "report.html", "final"):
        assert (run_dir / name).exists(), name
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("step_*")) if checkpoint_complete(p) is None] == [
        "step_00000015", "step_00000030"]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 31))
    # Logged every step: tokens_per_s * step_s is the step's token count, 16 rows (8 per
    # worker) of 1..48 tokens; and the steps took no longer than the whole run.
    per_step = [r["tokens_per_s"] * r["step_s"] for r in rows if "loss" in r]
    assert all(16 <= n <= 16 * 48 for n in per_step), per_step
    wall = json.loads((run_dir / "summary.json").read_text())["wall_time_s"]
    assert sum(r["step_s"] for r in rows if "loss" in r) < wall
    # Each worker's peak memory: at least the Python runtime with torch loaded (> 100 MiB).
    (memory,) = [r for r in rows if r.get("event") == "memory"]
    assert memory["step"] == 30 and len(memory["peak_rss_mb"]) == 2 and min(memory["peak_rss_mb"]) > 100
    assert json.loads((run_dir / "summary.json").read_text())["peak_rss_mb_per_worker"] == memory["peak_rss_mb"]
    assert "data:image/png;base64" in (run_dir / "report.html").read_text()


def test_sft_lora_learns_and_reloads_in_peft(ray_cluster, tiny_base_dir, tiny_tokenizer, addition_data, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    cfg = _config(tmp_path, tiny_base_dir, addition_data, "lora", "peft.method=lora", "peft.r=16",
                  "peft.alpha=32", "train.lr=3e-3")
    summary = run_training(cfg, echo=lambda *_: None)
    _assert_run_dir(cfg.run_dir)
    assert summary["final_eval_loss"] < 0.75 * summary["first_eval_loss"], summary
    assert summary["trainable_params"] < 0.5 * summary["total_params"]

    model = AutoPeftModelForCausalLM.from_pretrained(str(cfg.run_dir / "final"))
    assert isinstance(model, PeftModel)
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 34?"}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    # The adapter really changes the model: disabling it gives different logits.
    with torch.no_grad():
        with_adapter = model(**prompt).logits
        with model.disable_adapter():
            base = model(**prompt).logits
    assert not torch.allclose(with_adapter, base, atol=1e-4)


def test_sft_full_reloads_in_transformers(ray_cluster, tiny_model_dir, addition_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _config(tmp_path, tiny_model_dir, addition_data, "full", "train.lr=2e-3")
    summary = run_training(cfg, echo=lambda *_: None)
    _assert_run_dir(cfg.run_dir)
    assert summary["final_eval_loss"] < 0.75 * summary["first_eval_loss"], summary
    assert summary["trainable_params"] == summary["total_params"]

    trained = AutoModelForCausalLM.from_pretrained(str(cfg.run_dir / "final"))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    last_ckpt = sorted((cfg.run_dir / "checkpoints").glob("step_*"))[-1]
    saved = load_file(str(last_ckpt / "trainable.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(trained.state_dict()[name], saved[name])  # final == last checkpoint
    assert not torch.allclose(trained.state_dict()[name], base.state_dict()[name])
    out = trained.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 7 or int(out[0, -1]) == trained.generation_config.eos_token_id
