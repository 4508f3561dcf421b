"""Rollout throughput: the rayft engine pool (vLLM engine actors) against transformers
`generate` on the same bench model and prompts, and the time of a full weight sync.

    python -m benchmarks rollout [--prompts 256] [--new-tokens 128] [--engines 1]
"""

from __future__ import annotations

import argparse
import os
import sys

from benchmarks.common import Timer, bench_model, run_child, update_performance_doc, write_result
from benchmarks.hf_reference import child_main
from benchmarks.memory import PeakMemory

# The processes that generate on rayft's side: the engine actor and vLLM's engine core.
ENGINE_ROLES = ("ray::EngineActor", "VLLM::")


def prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"What is {10 + i % 90} + {20 + (i * 7) % 80}? Explain."}] for i in range(n)]


def run(n_prompts: int, new_tokens: int, engines: int) -> dict:
    import ray

    from cluster.ray_env import ensure_ray
    from rollout.config import RolloutConfig
    from rollout.engine import Sampling
    from rollout.pool import RolloutPool

    model_dir = bench_model()
    batch = prompts(n_prompts)
    # The random bench model rarely samples eos (about 1 in 8000 tokens), so both sides
    # generate nearly new_tokens per prompt; the rate counts the tokens actually produced.
    sampling = Sampling(temperature=1.0, max_new_tokens=new_tokens, seed=0)

    from transformers import AutoModelForCausalLM

    ensure_ray()
    with PeakMemory() as memory:
        pool = RolloutPool(str(model_dir), RolloutConfig(engine="vllm", num_engines=engines, max_model_len=512,
                                                         kv_cache_gb=2.0))
        pool.generate(batch[:8], sampling)  # warm-up
        with Timer() as t_pool:
            groups = pool.generate(batch, sampling)
        pool_tokens = sum(len(g[0].response_ids) for g in groups)
        state = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
        with Timer() as t_sync:
            report = pool.sync_weights(state)
        pool.shutdown()
    ray.shutdown()
    engine_mb = sum(peak for name, peak in memory.peaks().items() if name.startswith(ENGINE_ROLES))

    hf = run_child("benchmarks.rollout", {"side": "transformers", "model_dir": str(model_dir), "prompts": n_prompts,
                                          "new_tokens": new_tokens, "threads": os.cpu_count() or 1})
    hf_tokens, hf_seconds = hf["tokens"], hf["seconds"]

    pool_rate, hf_rate = pool_tokens / t_pool.seconds, hf_tokens / hf_seconds
    return {
        "settings": {"prompts": n_prompts, "new_tokens": new_tokens, "engines": engines, "model": "bench"},
        "rows": [{"metric": "generation tokens/s", "rayft": pool_rate, "reference": hf_rate,
                  "reference_name": "transformers generate"},
                 # The sync's cost as a share of the rollout it precedes.
                 {"metric": "full weight sync, s", "rayft": t_sync.seconds, "reference": t_pool.seconds,
                  "reference_name": f"one {n_prompts}x{new_tokens} pool rollout, s"},
                 {"metric": "peak RSS of the generating processes, MiB (lower is better)", "rayft": engine_mb,
                  "reference": hf["peak_rss_mb"], "reference_name": "transformers generate, one process"}],
        "memory_mb": {"rayft_processes": memory.peaks(), "transformers_process": hf["peak_rss_mb"]},
        "weight_sync": {"seconds": t_sync.seconds, "engine_seconds": report.engine_seconds,
                        "megabytes": report.bytes / 2**20, "buckets": report.buckets},
        "raw": {"pool_seconds": t_pool.seconds, "pool_tokens": pool_tokens,
                "hf_seconds": hf_seconds, "hf_tokens": hf_tokens},
    }


def run_transformers(payload: dict) -> dict:
    """Child process: transformers generate on the same prompts and sampling."""
    from rollout.engine import Sampling
    from rollout.hf_engine import HFEngine

    batch = prompts(payload["prompts"])
    hf = HFEngine(payload["model_dir"])
    hf.generate(batch[:8], Sampling(temperature=1.0, max_new_tokens=8, seed=0))  # warm-up
    with Timer() as t_hf:
        groups = hf.generate(batch, Sampling(temperature=1.0, max_new_tokens=payload["new_tokens"], seed=0))
    return {"seconds": t_hf.seconds, "tokens": sum(len(g[0].response_ids) for g in groups)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks rollout", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--engines", type=int, default=1)
    args = parser.parse_args(argv)
    result = run(args.prompts, args.new_tokens, args.engines)
    print(write_result("rollout", result))
    update_performance_doc()
    row = result["rows"][0]
    print(f"pool {row['rayft']:.0f} tokens/s vs transformers {row['reference']:.0f} tokens/s "
          f"(x{row['rayft'] / row['reference']:.2f}); weight sync {result['weight_sync']['seconds']:.2f}s")


if __name__ == "__main__":
    if "--child" in sys.argv:
        child_main({"transformers": run_transformers})
    else:
        main()
