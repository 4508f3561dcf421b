"""Every PEFT method on the tiny model, in-process: it trains through `Method` and the real
DDP strategy (one process), its loss lines up with peft's own, and `final/` reloads in
peft with identical logits. QLoRA is refused at config load without CUDA."""

import importlib.util
import json

import pytest
import torch

from cluster.config import load_config
from trainers.checkpoint import save_final
from trainers.data import build_datasets, write_synth
from trainers.errors import ConfigError
from trainers.method import Method
from trainers.setup import describe_trainable
from trainers.strategy import build_strategy

# method -> (extra overrides, lr, what every trainable name contains, what some contain)
METHODS = {
    "lora": (["peft.r=4"], 3e-3, "lora_", "lora_B"),
    "dora": (["peft.r=4"], 3e-3, "lora_", "lora_magnitude_vector"),
    "prefix": (["peft.num_virtual_tokens=4"], 1e-2, "prompt_encoder", "embedding"),
    "prompt": (["peft.num_virtual_tokens=4"], 1e-2, "prompt_encoder", "embedding"),
    "ia3": ([], 1e-2, "ia3_l", "down_proj"),
}
STEPS = 5


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_synth("addition", 24, tmp_path_factory.mktemp("peft") / "addition.jsonl", seed=2)


def job_for(model_dir, data_file, *overrides):
    return load_config(None, [f"model.path={model_dir}", f"data.train=[{data_file}]", "data.max_length=48",
                              "data.eval_fraction=0", "name=unit", "train.scheduler=constant",
                              "train.warmup_ratio=0", *overrides])


def built(job, tokenizer):
    method = Method(job, tokenizer, use_gpu=False)
    torch.manual_seed(0)
    return method, method.build_model()


def batch_of(job, tokenizer, method, n=6):
    """n examples of several lengths, so the batch has right padding."""
    examples = sorted(build_datasets(job.data, tokenizer).train, key=lambda e: len(e.input_ids))
    return method.collate(examples[::max(1, len(examples) // (n - 1))][:n - 1] + examples[-1:])


@pytest.mark.parametrize("name", METHODS)
def test_method_trains_saves_and_reloads(name, tiny_model_dir, tiny_tokenizer, data_file, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    extra, lr, every, some = METHODS[name]
    job = job_for(tiny_model_dir, data_file, f"peft.method={name}", f"train.lr={lr}", *extra)
    method, model = built(job, tiny_tokenizer)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(every in n for n in trainable) and any(some in n for n in trainable), trainable[:4]
    counts = describe_trainable(model)
    assert 0 < counts["trainable_params"] < 0.2 * counts["total_params"]

    batch = batch_of(job, tiny_tokenizer, method)
    strategy = build_strategy("ddp", model, job.train, STEPS, world_size=1)
    losses = []
    for _ in range(STEPS):
        summed, count = method.loss(strategy.model, batch)
        strategy.backward(summed / count)
        strategy.step()
        losses.append(float(summed.detach() / count))
    assert losses[-1] < losses[0] - 0.02, losses

    final = save_final(tmp_path, model, tiny_tokenizer)
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == model.peft_config["default"].peft_type
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(final))
    assert isinstance(reloaded, PeftModel)
    model.eval()
    with torch.no_grad():
        trained = model(**method.model_inputs(batch)).logits
        again = reloaded(**method.model_inputs(batch)).logits
    torch.testing.assert_close(again, trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["prefix", "prompt"])
def test_virtual_token_loss_lines_up(name, tiny_model_dir, tiny_tokenizer, data_file):
    """The loop's loss (logits sliced to the input, 2D mask, no position ids) equals peft's
    own labelled loss, and right padding changes no row's loss."""
    job = job_for(tiny_model_dir, data_file, f"peft.method={name}", "peft.num_virtual_tokens=4")
    method, model = built(job, tiny_tokenizer)
    with torch.no_grad():  # trained-looking virtual tokens, so a misalignment would show
        for p in model.prompt_encoder.parameters():
            p.normal_()
    model.eval()
    batch = batch_of(job, tiny_tokenizer, method, n=3)
    assert (batch["attention_mask"] == 0).any(), "want a padded row"
    with torch.no_grad():
        summed, count = method.loss(model, batch)
        reference = model(**method.model_inputs(batch), labels=batch["labels"]).loss
        assert float(summed / count) == pytest.approx(float(reference), rel=1e-5)
        alone = 0.0
        for row in range(3):
            n = int(batch["attention_mask"][row].sum())
            alone += float(method.loss(model, {k: v[row:row + 1, :n] for k, v in batch.items()})[0])
    assert float(summed) == pytest.approx(alone, rel=1e-5)


def test_prompt_methods_refuse_packing_at_load(tiny_model_dir, data_file):
    with pytest.raises(ConfigError, match="data.packing"):
        job_for(tiny_model_dir, data_file, "peft.method=prompt", "data.packing=true")


def test_ia3_defaults_and_explicit_modules(tiny_model_dir, tiny_tokenizer, data_file):
    _, model = built(job_for(tiny_model_dir, data_file, "peft.method=ia3"), tiny_tokenizer)
    config = model.peft_config["default"]
    assert set(config.target_modules) == {"k_proj", "v_proj", "down_proj"}
    assert set(config.feedforward_modules) == {"down_proj"}
    _, model = built(job_for(tiny_model_dir, data_file, "peft.method=ia3", "peft.target_modules=[q_proj, up_proj]",
                             "peft.feedforward_modules=[up_proj]"), tiny_tokenizer)
    assert set(model.peft_config["default"].feedforward_modules) == {"up_proj"}


def test_modules_to_save_trains_and_saves_the_head(tiny_model_dir, tiny_tokenizer, data_file, tmp_path):
    from safetensors.torch import load_file

    job = job_for(tiny_model_dir, data_file, "peft.method=lora", "peft.modules_to_save=[lm_head]")
    _, model = built(job, tiny_tokenizer)
    assert any("lm_head.modules_to_save" in n for n, p in model.named_parameters() if p.requires_grad)
    saved = load_file(str(save_final(tmp_path, model, tiny_tokenizer) / "adapter_model.safetensors"))
    assert any("lm_head" in k for k in saved)


@pytest.mark.parametrize("overrides, key", [
    (["peft.method=prompt", "peft.num_virtual_tokens=0"], "peft.num_virtual_tokens"),
    (["peft.method=lora", "peft.feedforward_modules=[down_proj]"], "peft.feedforward_modules"),
    (["peft.method=ia3", "peft.target_modules=[k_proj]", "peft.feedforward_modules=[down_proj]"],
     "peft.feedforward_modules"),
    (["peft.method=dora", "peft.r=0"], "peft.r"),
])
def test_config_errors(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.path=/m", "data.train=d.jsonl", "name=x", *overrides])
    assert err.value.key == key


def test_unknown_target_module_names_the_key(tiny_model_dir, tiny_tokenizer, data_file):
    job = job_for(tiny_model_dir, data_file, "peft.method=dora", "peft.target_modules=[nope_proj]")
    with pytest.raises(ConfigError) as err:
        built(job, tiny_tokenizer)
    assert err.value.key == "peft.target_modules" and "nope_proj" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None,
                    reason="this machine can run QLoRA")
def test_qlora_refused_at_config_load_without_cuda():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.path=/m", "data.train=d.jsonl", "name=x", "peft.method=qlora"])
    assert err.value.key == "peft.method"
    assert "qlora needs a CUDA GPU and bitsandbytes" in str(err.value)
