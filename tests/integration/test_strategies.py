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
