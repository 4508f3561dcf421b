"""DoRA and gradual unfreezing on 2 Ray Train workers (gloo DDP): eval loss falls; the DoRA
adapter reloads in peft; gradual unfreezing trains each block only from its step on
(the checkpoints show it) through the DDP re-wraps, and final/ loads in transformers."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cluster.config import load_config
from cluster.train import run_training


def _config(tmp_path, model_dir, data, name, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"data.train=[{data}]", "data.max_length=48", "data.eval_fraction=0.05",
        f"output_dir={tmp_path}", f"name={name}", "train.batch_size=8", "train.max_steps=20",
        "train.eval_every=10", "train.warmup_ratio=0.1", "cluster.num_workers=2", *extra])


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dora_learns_and_reloads_in_peft(ray_cluster, tiny_base_dir, tiny_tokenizer, addition_data, tmp_path):
    from peft import AutoPeftModelForCausalLM

    cfg = _config(tmp_path, tiny_base_dir, addition_data, "dora", "peft.method=dora", "peft.r=16",
                  "peft.alpha=32", "train.lr=3e-3")
    summary = run_training(cfg, echo=lambda *_: None)
    assert summary["steps"] == 20
    assert summary["final_eval_loss"] < 0.8 * summary["first_eval_loss"], summary
    assert summary["trainable_params"] < 0.2 * summary["total_params"]

    final = cfg.run_dir / "final"
    assert json.loads((final / "adapter_config.json").read_text())["use_dora"] is True
    model = AutoPeftModelForCausalLM.from_pretrained(str(final)).eval()
    assert any("lora_magnitude_vector" in k for k in load_file(str(final / "adapter_model.safetensors")))
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 34?"}],
                                                add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        adapted = model(**prompt).logits
        with model.disable_adapter():
            base = model(**prompt).logits
    assert not torch.allclose(adapted, base, atol=1e-4)


def test_gradual_unfreezing_on_ddp(ray_cluster, tiny_model_dir, addition_data, tmp_path):
    from transformers import AutoModelForCausalLM

    # 2 blocks: head only for steps 0-4, + block 1 from step 5, + block 0 from step 10.
    cfg = _config(tmp_path, tiny_model_dir, addition_data, "gradual", "freeze.mode=gradual", "freeze.layers=0",
                  "freeze.unfreeze_every=5", "train.lr=2e-3", "train.save_every=5", "train.keep_checkpoints=4")
    summary = run_training(cfg, echo=lambda *_: None)
    assert summary["final_eval_loss"] < 0.8 * summary["first_eval_loss"], summary

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).state_dict()
    head = {"model.norm.weight", "lm_head.weight"}
    start = next(r for r in _rows(cfg.run_dir) if r.get("event") == "start")
    assert start["trainable_params"] == sum(base[n].numel() for n in head)
    assert start["unfrozen_later_params"] == sum(t.numel() for n, t in base.items() if ".layers." in n)

    def saved(step):  # a DDP checkpoint holds exactly the tensors that were training
        return set(load_file(str(cfg.run_dir / "checkpoints" / f"step_{step:08d}" / "trainable.safetensors")))

    block = lambda i: {n for n in base if n.startswith(f"model.layers.{i}.")}  # noqa: E731
    assert saved(5) == head
    assert saved(10) == head | block(1)
    assert saved(15) == saved(20) == head | block(1) | block(0)

    trained = AutoModelForCausalLM.from_pretrained(str(cfg.run_dir / "final")).state_dict()
    assert torch.equal(trained["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight", "lm_head.weight"):
        assert not torch.equal(trained[name], base[name]), name


@pytest.mark.parametrize("method", ["prefix", "prompt", "ia3"])
def test_other_peft_methods_train_save_reload(method, ray_cluster, tiny_base_dir, addition_data, tmp_path):
    """Prefix tuning, prompt tuning and IA3 on 2 workers: training lowers eval loss, and the
    saved adapter reloads in peft and reproduces the run's own final eval loss."""
    from peft import AutoPeftModelForCausalLM

    from trainers.config import DataConfig, DataSource
    from trainers.data import build_datasets
    from trainers.method import Method
    from trainers.models import load_tokenizer

    lr = {"prefix": 1e-2, "prompt": 3e-2, "ia3": 3e-2}[method]
    cfg = _config(tmp_path, tiny_base_dir, addition_data, method, f"peft.method={method}",
                  "peft.num_virtual_tokens=8", f"train.lr={lr}")
    summary = run_training(cfg, echo=lambda *_: None)
    assert summary["final_eval_loss"] < 0.9 * summary["first_eval_loss"], summary

    model = AutoPeftModelForCausalLM.from_pretrained(str(cfg.run_dir / "final")).eval()
    tokenizer = load_tokenizer(tiny_base_dir)
    data = build_datasets(DataConfig(train=[DataSource(path=str(addition_data))], max_length=48, eval_fraction=0.05),
                          tokenizer)
    method_obj = Method(cfg, tokenizer, use_gpu=False)
    batch = method_obj.collate(data.eval)
    with torch.no_grad():
        summed, count = method_obj.loss(model, batch)
    assert float(summed / count) == pytest.approx(summary["final_eval_loss"], rel=1e-4)


@pytest.mark.parametrize("mode, extra, trained", [
    ("last_layers", ["freeze.layers=1"], ("layers.1.", "model.norm.", "lm_head.")),
    ("first_layers", ["freeze.layers=1"], ("layers.0.",)),
    ("modules", ["freeze.modules=[lm_head]"], ("lm_head.",)),
])
def test_freezing_modes_on_two_workers(mode, extra, trained, ray_cluster, tiny_model_dir, addition_data, tmp_path):
    """Frozen tensors in final/ are bit-identical to the start model; trained ones moved."""
    cfg = _config(tmp_path, tiny_model_dir, addition_data, mode, f"freeze.mode={mode}", *extra,
                  "train.max_steps=6", "train.eval_every=0", "train.lr=2e-3")
    run_training(cfg, echo=lambda *_: None)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    final = load_file(str(cfg.run_dir / "final" / "model.safetensors"))
    for name, tensor in base.items():
        if any(part in name for part in trained):
            assert not torch.equal(final[name], tensor), f"{name} should have trained"
        else:
            assert torch.equal(final[name], tensor), f"{name} should be frozen"
