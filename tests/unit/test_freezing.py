"""Partial fine-tuning on the tiny (2-block) Llama, in-process through `Method` and the real
DDP strategy (one process): frozen parameters stay bit-identical and the chosen ones
change in every mode; the gradual schedule is exact and a pure function of the step."""

import pytest
import torch

from cluster.config import load_config
from trainers.data import build_datasets, write_synth
from trainers.errors import ConfigError
from trainers.freezing import find_blocks, name_matches
from trainers.method import Method
from trainers.setup import describe_trainable
from trainers.strategy import build_strategy

HEAD = {"model.norm.weight", "lm_head.weight"}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_synth("addition", 16, tmp_path_factory.mktemp("freeze") / "addition.jsonl", seed=3)


@pytest.fixture
def setup(tiny_model_dir, tiny_tokenizer, data_file):
    """setup(*overrides) -> (method, model, one batch), the model built as the loop builds it."""
    def make(*overrides):
        job = load_config(None, [f"model.path={tiny_model_dir}", f"data.train=[{data_file}]", "name=unit",
                                 "data.max_length=48", "data.eval_fraction=0", "train.lr=1e-3",
                                 "train.scheduler=constant", "train.warmup_ratio=0", *overrides])
        method = Method(job, tiny_tokenizer, use_gpu=False)
        model = method.build_model()
        return method, model, method.collate(build_datasets(job.data, tiny_tokenizer).train[:4])
    return make


def block(i: int) -> str:
    return f"model.layers.{i}."


def names(model, where=lambda n: True) -> set[str]:
    return {n for n, _ in model.named_parameters() if where(n)}


def training(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def head_and_blocks(model, *indices) -> set[str]:
    return names(model, lambda n: n in HEAD or any(n.startswith(block(i)) for i in indices))


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(before, model) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}


class Trainer:
    """`run(steps)` takes optimizer steps as the loop does: hooks, forward, backward, step."""

    def __init__(self, method, model, batch, total_steps: int):
        self.method, self.batch = method, batch
        self.strategy = build_strategy("ddp", model, method.job.train, total_steps, world_size=1)
        self.hooks = method.hooks()

    def run(self, steps) -> None:
        for step in steps:
            if any([hook(step, self.strategy.module) for hook in self.hooks.before_step]):
                self.strategy.refresh_trainable()
            summed, count = self.method.loss(self.strategy.model, self.batch)
            self.strategy.backward(summed / count)
            self.strategy.step()


@pytest.mark.parametrize("overrides, expect", [
    (["freeze.mode=last_layers", "freeze.layers=1"], lambda n: n.startswith(block(1)) or n in HEAD),
    (["freeze.mode=first_layers", "freeze.layers=1"], lambda n: n.startswith(block(0))),
    (["freeze.mode=modules", "freeze.modules=[lm_head, self_attn.q_proj]"],
     lambda n: n == "lm_head.weight" or n.endswith("self_attn.q_proj.weight")),
    (["freeze.mode=first_layers", "freeze.layers=1", "freeze.modules=[model.norm]"],
     lambda n: n.startswith(block(0)) or n == "model.norm.weight"),
], ids=["last_layers", "first_layers", "modules", "first_layers+modules"])
def test_static_modes_train_only_their_parameters(setup, overrides, expect):
    method, model, batch = setup(*overrides)
    chosen = names(model, expect)
    assert training(model) == chosen
    counts = describe_trainable(model)
    assert counts["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in chosen)
    assert counts["trainable_params"] < counts["total_params"]

    before = snapshot(model)
    Trainer(method, model, batch, 2).run(range(2))
    assert changed(before, model) == chosen  # frozen ones bit-identical, every chosen one moved


def test_gradual_schedule_is_exact(setup):
    # 2 blocks; start with the head only, one more block every 2 steps.
    method, model, _ = setup("freeze.mode=gradual", "freeze.layers=0", "freeze.unfreeze_every=2")
    counts = describe_trainable(model)  # at start, as the loop logs it
    assert counts["trainable_params"] == sum(p.numel() for n, p in model.named_parameters() if n in HEAD)
    assert counts["unfrozen_later_params"] == sum(p.numel() for n, p in model.named_parameters()
                                                  if n.startswith("model.layers."))

    hook = method.hooks().before_step[0]
    expected = [(), (), (1,), (1,), (1, 0), (1, 0), (1, 0)]  # blocks training at steps 0..6
    assert hook(0, model) is True  # the optimizer was built with the later blocks; freeze them now
    for step, blocks in enumerate(expected):
        hook(step, model)
        assert training(model) == head_and_blocks(model, *blocks), step
    # A pure function of the step: jumping to a step (as a resume does) gives its set.
    assert hook(2, model) is True and hook(2, model) is False
    assert training(model) == head_and_blocks(model, 1)


def test_gradual_start_offsets_by_the_initial_blocks(setup):
    _, model, _ = setup("freeze.mode=gradual", "freeze.layers=1", "freeze.unfreeze_every=3")
    starts = {n: getattr(p, "unfreeze_step", 0) for n, p in model.named_parameters() if p.requires_grad}
    assert set(starts) == head_and_blocks(model, 0, 1)
    assert {s for n, s in starts.items() if n.startswith(block(0))} == {3}
    assert {s for n, s in starts.items() if not n.startswith(block(0))} == {0}


def test_output_side_of_a_classifier(tiny_model_dir, setup):
    from transformers import AutoModelForSequenceClassification

    from trainers.setup import apply_peft_and_freezing

    method, _, _ = setup("freeze.mode=last_layers", "freeze.layers=1")
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=3)
    model = apply_peft_and_freezing(model, method.job, task_type="SEQ_CLS")
    assert training(model) == names(model, lambda n: n.startswith(block(1)) or n in ("model.norm.weight",
                                                                                      "score.weight"))


def test_gradual_keeps_blocks_frozen_until_their_step(setup):
    method, model, batch = setup("freeze.mode=gradual", "freeze.layers=0", "freeze.unfreeze_every=2")
    before = snapshot(model)
    trainer = Trainer(method, model, batch, 5)
    trainer.run(range(0, 2))
    assert changed(before, model) == HEAD
    trainer.run(range(2, 4))
    assert changed(before, model) == head_and_blocks(model, 1)
    trainer.run(range(4, 5))
    assert changed(before, model) == head_and_blocks(model, 1, 0)  # all but the embedding


def test_freezing_narrows_a_peft_method(setup):
    _, model, _ = setup("peft.method=lora", "peft.r=2", "freeze.mode=last_layers", "freeze.layers=1")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".layers.1." in n and "lora_" in n for n in trainable)
    # A base weight under an adapter is never unfrozen: that is peft.modules_to_save's job.
    with pytest.raises(ConfigError, match="modules_to_save"):
        setup("peft.method=lora", "peft.r=2", "freeze.mode=last_layers", "freeze.modules=[lm_head]")
    with pytest.raises(ConfigError, match="leaves nothing to train"):
        setup("peft.method=prompt", "peft.num_virtual_tokens=2", "freeze.mode=last_layers")


def test_bad_names_and_sizes_are_config_errors(setup):
    with pytest.raises(ConfigError) as err:
        setup("freeze.mode=modules", "freeze.modules=[lm_head, attn.qq_proj]")
    assert err.value.key == "freeze.modules" and "attn.qq_proj" in str(err.value) and "q_proj" in str(err.value)
    with pytest.raises(ConfigError) as err:
        setup("freeze.mode=last_layers", "freeze.layers=3")
    assert err.value.key == "freeze.layers"
    with pytest.raises(ConfigError) as err:
        setup("freeze.modules=[lm_head]")  # mode none trains everything already
    assert err.value.key == "freeze.modules"


def test_blocks_found_through_a_peft_wrapper_and_names_match_whole_components(setup):
    _, model, _ = setup("peft.method=ia3")
    name, blocks = find_blocks(model)
    assert name == "base_model.model.model.layers" and len(blocks) == 2
    assert name_matches("base_model.model.model.norm.weight", "model.norm")
    assert name_matches("model.layers.0.self_attn.q_proj.weight", "self_attn.q_proj")
    assert not name_matches("model.layers.0.input_layernorm.weight", "norm")
    assert not name_matches("model.layers.0.self_attn.q_proj.weight", "attn.q_proj")


# The later blocks require grad at load time (so the optimizer holds them) while a
# checkpoint from before their step rightly lacks them: load_state must accept that.
def test_gradual_resume_mid_schedule(setup, tmp_path):
    """Checkpoint after step 3 (bottom block still frozen), rebuild, restore, finish: the
    same weights as an uninterrupted run."""
    overrides = ("freeze.mode=gradual", "freeze.layers=0", "freeze.unfreeze_every=2")
    method, model, batch = setup(*overrides)
    Trainer(method, model, batch, 6).run(range(6))
    straight = snapshot(model)

    method, model, batch = setup(*overrides)
    first = Trainer(method, model, batch, 6)
    first.run(range(3))
    first.strategy.save_state(tmp_path, rank=0)
    method, model, batch = setup(*overrides)
    second = Trainer(method, model, batch, 6)
    second.strategy.load_state(tmp_path, rank=0)
    second.run(range(3, 6))
    assert changed(straight, model) == set()
