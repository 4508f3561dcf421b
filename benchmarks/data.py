"""Data preparation at scale: reading, validating and tokenising one generated chat file of
`--rows` rows (2 million by default) three ways, each in a fresh process:

- rayft streaming (`data.streaming: true`): Ray Data tasks over every core, samples
  written to memory-mapped Arrow files (`trainers.data.streaming`);
- rayft in memory (the default): the driver reads and tokenises every row itself;
- the reference, what TRL and LLaMA-Factory users run: Hugging Face `datasets`
  (`load_dataset("json")`, then `map(num_proc=<every core>)` applying the chat template).

It reports rows/s (rows in over wall seconds of the whole build, Ray's start excluded)
and the driver's peak RSS (`ru_maxrss` of the process that asked for the data; Ray's and
`datasets`' worker processes are not the driver). The reference tokenises without
computing a loss mask; rayft's builds also find every assistant span and validate each
row. The streamed build also runs at a tenth of the rows, to show its driver memory
does not grow with the data.

    python -m benchmarks data [--rows 2000000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import CACHE, bench_model, run_child, update_performance_doc, write_result

SIDES = ("streaming", "memory", "datasets")


def data_file(rows: int) -> Path:
    """A chat .jsonl of `rows` rows (the synthetic addition task), written once and cached."""
    from trainers.data import synth_rows

    path = CACHE / f"data-{rows}.jsonl"
    if not path.exists():
        part = path.with_suffix(".partial")
        with open(part, "w") as f:
            for start in range(0, rows, 100_000):
                f.writelines(json.dumps(r) + "\n" for r in synth_rows("small_addition_mixed", min(100_000, rows - start),
                                                                    seed=start))
        part.rename(path)
    return path


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(side: str, path: str, model: str) -> dict:
    """In the child: build the data one way; rows, seconds, tokens and the peak RSS."""
    from trainers.models import load_tokenizer

    tokenizer = load_tokenizer(model)
    baseline = peak_rss_mb()
    if side == "datasets":
        seconds, samples, tokens = _with_datasets(path, tokenizer)
    else:
        from trainers.config import DataConfig, DataSource
        from trainers.data import build_datasets

        cfg = DataConfig(train=[DataSource(path=path)], eval_fraction=0.0, max_length=128,
                         streaming=side == "streaming")
        out = Path(tempfile.mkdtemp(dir=CACHE, prefix="data-run-")) / "data"
        if side == "streaming":
            from cluster.ray_env import ensure_ray

            ensure_ray()
        start = time.perf_counter()
        data = build_datasets(cfg, tokenizer, stream_dir=out)
        seconds, samples, tokens = time.perf_counter() - start, len(data.train), data.stats["train_tokens"]
    return {"seconds": seconds, "samples": samples, "tokens": tokens, "peak_rss_mb": peak_rss_mb(),
            "baseline_rss_mb": baseline}


def _with_datasets(path: str, tokenizer) -> tuple[float, int, int]:
    import datasets

    def tokenise(batch):
        return {"input_ids": [tokenizer.apply_chat_template(m, tokenize=True, return_dict=True)["input_ids"]
                              for m in batch["messages"]]}

    cache = tempfile.mkdtemp(dir=CACHE, prefix="data-hf-")
    start = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
    ds = ds.map(tokenise, batched=True, num_proc=os.cpu_count(), remove_columns=ds.column_names)
    tokens = sum(len(ids) for batch in ds.iter(batch_size=10_000) for ids in batch["input_ids"])
    return time.perf_counter() - start, len(ds), tokens


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the generated file (default 2000000)")
    args = parser.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    model, big, small = str(bench_model()), data_file(args.rows), data_file(args.rows // 10)
    sides = {side: run_child("benchmarks.data", {"side": side, "path": str(big), "model": model}, timeout=7200)
             for side in SIDES}
    sides["streaming_small"] = run_child("benchmarks.data", {"side": "streaming", "path": str(small), "model": model})
    for name, side in sides.items():
        side["rows_per_s"] = side["samples"] / side["seconds"]
        print(name, json.dumps(side))
    ref = sides["datasets"]
    name = f"datasets {__import__('datasets').__version__} map, num_proc={os.cpu_count()}"
    n = f"{args.rows / 1e6:g}M rows"
    rows = [
        {"metric": f"data prep rows/s, {n}, streaming", "rayft": sides["streaming"]["rows_per_s"],
         "reference": ref["rows_per_s"], "reference_name": name},
        {"metric": f"data prep rows/s, {n}, in memory", "rayft": sides["memory"]["rows_per_s"],
         "reference": ref["rows_per_s"], "reference_name": name},
        {"metric": f"data prep rows/s, {n}, streaming vs in memory", "rayft": sides["streaming"]["rows_per_s"],
         "reference": sides["memory"]["rows_per_s"], "reference_name": "rayft in memory"},
        {"metric": f"data prep peak driver RSS, MiB, {n}, streaming (lower is better)",
         "rayft": sides["streaming"]["peak_rss_mb"], "reference": ref["peak_rss_mb"], "reference_name": name},
        {"metric": f"data prep peak driver RSS, MiB, {n}, streaming vs in memory (lower is better)",
         "rayft": sides["streaming"]["peak_rss_mb"], "reference": sides["memory"]["peak_rss_mb"],
         "reference_name": "rayft in memory"},
        {"metric": f"data prep peak driver RSS, MiB, streaming, {n} vs a tenth of it (lower is better)",
         "rayft": sides["streaming"]["peak_rss_mb"], "reference": sides["streaming_small"]["peak_rss_mb"],
         "reference_name": "rayft streaming, a tenth of the rows"},
    ]
    print(write_result("data", {"rows_in_file": args.rows, "sides": sides, "rows": rows}))
    update_performance_doc()


if __name__ == "__main__":
    if "--child" in sys.argv:
        payload = json.loads(sys.argv[sys.argv.index("--child") + 1])
        print(json.dumps(run_side(payload["side"], payload["path"], payload["model"])))
    else:
        main()
