"""How many copies of the model's weights a method holds in a training worker: SFT (full
or LoRA) and DPO with a LoRA adapter hold one (DPO's reference is the adapter switched
off), full DPO holds two (a frozen reference copy). Every tensor the process can reach is
counted, so a stray copy anywhere (a cached state dict, a second load) shows up."""

import gc
import warnings

import pytest
import torch

from cluster.config import load_config
from trainers.data import write_synth
from trainers.dpo import DPOMethod
from trainers.method import Method
from trainers.models import load_causal_lm


def reachable_storages() -> dict[int, int]:
    """data pointer -> bytes of every tensor storage reachable from Python objects."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance() on some torch.distributed objects warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        if obj.device.type != "meta":
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


def model_bytes(model_dir) -> int:
    model = load_causal_lm(model_dir)
    try:
        return sum(p.numel() * p.element_size() for p in model.parameters())
    finally:
        del model
        gc.collect()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_synth("addition", 16, tmp_path_factory.mktemp("copies") / "addition.jsonl", seed=1)


@pytest.mark.parametrize("method_cls, overrides, copies", [
    (Method, ["method=sft"], 1),
    (Method, ["method=sft", "peft.method=lora"], 1),
    (DPOMethod, ["method=dpo", "peft.method=lora"], 1),
    (DPOMethod, ["method=dpo"], 2),
], ids=["sft-full", "sft-lora", "dpo-lora", "dpo-full"])
def test_a_worker_holds_only_the_model_copies_its_method_needs(method_cls, overrides, copies, tiny_model_dir,
                                                              tiny_tokenizer, data_file):
    one_copy = model_bytes(tiny_model_dir)
    job = load_config(None, [f"model.path={tiny_model_dir}", f"data.train=[{data_file}]", "name=copies", *overrides])
    before = reachable_storages()
    method = method_cls(job, tiny_tokenizer, use_gpu=False)
    _model = method.build_model()  # kept alive while counting
    new = {ptr: n for ptr, n in reachable_storages().items() if ptr not in before}
    held = sum(new.values()) / one_copy
    # LoRA adds its small adapter matrices on top of the one copy of the base.
    assert copies <= held < copies + 0.15, f"{held:.2f} copies of the weights held, expected {copies}"
