"""Advantage whitening over the whole step: two data-parallel workers in a real gloo
process group, each holding half of a rollout batch, whiten exactly as one worker holding
all of it would (PPO's advantages and REINFORCE++'s returns), not with their own halves'
statistics."""

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.rl.config import AlgoConfig
from trainers.rl.experience import Experience
from trainers.rl.objectives import PPO, AdaptiveKL, GroupRL
from trainers.strategy import all_reduce_sum

ROWS, LENGTH = 8, 5


def _batch() -> Experience:
    """Rows whose halves differ in scale, so per-half whitening gives other numbers."""
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(LENGTH)[None, :] < torch.randint(2, LENGTH + 1, (ROWS, 1), generator=g)).float()
    scores = torch.cat([torch.rand(ROWS // 2, generator=g), 5 + 3 * torch.rand(ROWS // 2, generator=g)])
    tokens = torch.zeros(ROWS, LENGTH, dtype=torch.long)
    old_logp = torch.full((ROWS, LENGTH), -1.0)
    return Experience(input_ids=tokens, attention_mask=tokens, position_ids=tokens, response_ids=tokens,
                      mask=mask, engine_logp=old_logp, scores=scores, old_logp=old_logp,
                      ref_logp=old_logp - 0.1 * torch.rand(ROWS, LENGTH, generator=g),
                      old_values=torch.rand(ROWS, LENGTH, generator=g) * mask)


def _share(exp: Experience, rows: slice) -> Experience:
    return dataclasses.replace(exp, **{name: getattr(exp, name)[rows] for name in
                                       ("input_ids", "attention_mask", "position_ids", "response_ids", "mask",
                                        "engine_logp", "scores", "old_logp", "ref_logp", "old_values")})


def _objectives():
    return {"ppo": PPO(AlgoConfig(samples_per_prompt=1, whiten_advantages=True), AdaptiveKL(0.05, 0, 1), 1.0),
            "reinforce_pp": GroupRL(AlgoConfig(estimator="reinforce_pp", samples_per_prompt=1, kl_coef=0.05),
                                    AdaptiveKL(0.05, 0, 1), 1.0)}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        mine = _share(_batch(), slice(rank * ROWS // 2, (rank + 1) * ROWS // 2))
        result = {}
        for name, objective in _objectives().items():
            objective.prepare(mine, 1, lambda values: all_reduce_sum(values, "cpu"))
            result[name] = mine.advantages.clone()
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_two_workers_whiten_with_the_whole_steps_statistics(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    halves = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, objective in _objectives().items():
        whole = _batch()
        objective.prepare(whole, 1)
        sharded = torch.cat([halves[0][name], halves[1][name]])
        torch.testing.assert_close(sharded, whole.advantages, rtol=1e-5, atol=1e-6)
        alone = _share(_batch(), slice(0, ROWS // 2))
        objective.prepare(alone, 1)  # what a worker whitening its own half alone would train on
        assert (alone.advantages - whole.advantages[: ROWS // 2]).abs().max() > 0.1, name
