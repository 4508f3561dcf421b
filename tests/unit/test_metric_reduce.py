"""Step metrics reduced over 2 real gloo workers: means are averaged, per-worker maxima
(`*_max`) are the maximum over the workers, not their mean."""

import types

import torch.distributed as dist
import torch.multiprocessing as mp

from trainers.rl.loop import RLLoop
from trainers.strategy import all_reduce_max


def _worker(rank: int, init: str, out) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        assert all_reduce_max([float(rank), 5.0 - rank], "cpu") == [1.0, 5.0]
        loop = types.SimpleNamespace(worker=types.SimpleNamespace(world_size=2, device="cpu"))
        row = RLLoop.reduce(loop, {"logprob_diff": 1.0 + rank, "logprob_diff_max": [3e-5, 2e-3][rank]})
        out.put((rank, row))
    finally:
        dist.destroy_process_group()


def test_maxima_are_reduced_with_max_and_the_rest_averaged(tmp_path):
    context = mp.get_context("spawn")
    out = context.Queue()
    procs = [context.Process(target=_worker, args=(rank, f"file://{tmp_path / 'pg'}", out)) for rank in range(2)]
    for p in procs:
        p.start()
    rows = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert rows[0] == rows[1] == {"logprob_diff": 1.5, "logprob_diff_max": 2e-3}
