"""DeepSpeed ZeRO-1 (optimizer state offloaded to CPU memory), ZeRO-2 and ZeRO-3 full
fine-tuning on 2 Ray CPU workers: eval loss falls, the sharded checkpoints are resumable
DeepSpeed checkpoints, and final/ holds the full consolidated weights (equal to an
independent consolidation of the last checkpoint)."""

import pytest
import torch

from cluster.config import load_config
from cluster.train import run_training
from trainers.checkpoint import checkpoint_complete


@pytest.mark.parametrize("stage, extra", [(1, ["cluster.offload_optimizer=true"]), (2, []), (3, [])])
def test_zero_full_finetune(stage, extra, ray_cluster, tiny_model_dir, addition_data, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    cfg = load_config(None, [
        f"model.path={tiny_model_dir}", f"data.train=[{addition_data}]", "data.max_length=48",
        f"output_dir={tmp_path}", f"name=zero{stage}", "train.batch_size=8", "train.max_steps=16",
        "train.eval_every=8", "train.save_every=8", "train.lr=2e-3", f"cluster.strategy=zero{stage}",
        "cluster.num_workers=2", *extra])
    summary = run_training(cfg, echo=lambda *_: None)
    assert summary["final_eval_loss"] < 0.7 * summary["first_eval_loss"], summary

    last = sorted((cfg.run_dir / "checkpoints").glob("step_*"))[-1]
    assert last.name == "step_00000016" and checkpoint_complete(last) is None  # every rank's part arrived
    # one optimizer shard per worker, merged into one checkpoint directory
    assert sorted(p.name for p in (last / "zero").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    final = AutoModelForCausalLM.from_pretrained(str(cfg.run_dir / "final"))
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    reference.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(last), tag="zero"), strict=False)
    probe = torch.tensor([[1, 40, 41, 42, 43, 2]])
    with torch.no_grad():
        assert torch.allclose(final(probe).logits, reference(probe).logits, atol=1e-5)
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        assert not torch.allclose(final(probe).logits, base(probe).logits, atol=1e-3)


def _zero3_reference_worker(config: dict) -> None:
    """A DPO worker's set-up under ZeRO-3 (policy and frozen reference), then the shard
    each worker holds and its reference log-probs against plain transformers."""
    import json
    from pathlib import Path

    import ray.train
    from transformers import AutoModelForCausalLM

    from trainers.data import build_datasets
    from trainers.dpo import DPOMethod
    from trainers.models import load_tokenizer
    from trainers.reward import encode_preference_sets
    from trainers.strategy import build_strategy

    job, rank = config["job"], ray.train.get_context().get_world_rank()
    tokenizer = load_tokenizer(job.model.path)
    datasets = build_datasets(job.data, tokenizer, purpose="preference")
    encode_preference_sets(datasets, tokenizer, job.data, "pairwise")
    method = DPOMethod(job, tokenizer, use_gpu=False)
    strategy = build_strategy("zero3", method.build_model(), job.train, 1, 2)
    params = list(method.reference.copy.module.parameters())
    batch = method.collate(datasets.train[rank * 4:rank * 4 + 4])
    ours = method.reference_logps(strategy.model, batch)
    plain = AutoModelForCausalLM.from_pretrained(job.model.path)
    with torch.no_grad():
        expected, _ = method._sequence_logps(plain(**method.model_inputs(batch)).logits, batch)
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({
        "local": sum(p.ds_tensor.numel() for p in params), "total": sum(p.ds_numel for p in params),
        "max_diff": float((ours - expected).abs().max()), "pairs": len(batch["index"])}))


def test_zero3_shards_the_frozen_reference_and_keeps_its_log_probs(ray_cluster, tiny_base_dir, tmp_path):
    """Under zero3 each of 2 workers holds about half of the frozen reference, and DPO's
    reference log-probs equal plain transformers' on the start model."""
    import json
    import sys

    from ray import cloudpickle
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    from trainers.data import write_synth

    data = write_synth("addition_pref", 32, tmp_path / "pairs.jsonl", seed=3)
    job = load_config(None, [f"model.path={tiny_base_dir}", f"data.train=[{data}]", "data.max_length=48",
                             "method=dpo", "cluster.strategy=zero3", "model.reference=frozen_copy",
                             f"output_dir={tmp_path}", "name=ref", "train.batch_size=4"])
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import a test module
    TorchTrainer(_zero3_reference_worker, train_loop_config={"job": job, "out": str(tmp_path)},
                 scaling_config=ScalingConfig(num_workers=2, use_gpu=False)).fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in ranks:
        assert rank["pairs"] == 4
        assert 0.4 < rank["local"] / rank["total"] < 0.6, rank  # about half, not the whole copy
        assert rank["max_diff"] < 1e-4, rank
