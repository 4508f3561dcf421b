"""From a `DataConfig` to ready train and eval sets: load every source, hold out eval,
tokenise, mix the sources by weight, pack, and count what happened (`stats`).

For purpose "sft" the sets hold `Example`s. For the other purposes (preference, scored,
classification, prompt) they hold the normalised records, split and mixed the same
way: those trainers tokenise pairs and prompts their own way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

from trainers.config import DataConfig, DataSource
from trainers.data.dataset_info import read_dataset_info
from trainers.data.load import LoadResult, load_records
from trainers.data.mixing import mix_with_replay, split
from trainers.data.packing import pack
from trainers.data.records import IGNORE_INDEX
from trainers.data.render import encode_records
from trainers.errors import UserError


@dataclass
class Datasets:
    train: list  # Examples for sft, records otherwise
    eval: list
    stats: dict = field(default_factory=dict)


def build_datasets(cfg: DataConfig, tokenizer, purpose: str = "sft", stream_dir: Optional[Path] = None) -> Datasets:
    """The train and eval sets of `cfg`; with `cfg.streaming`, tokenised by Ray Data into
    `stream_dir` (`trainers.data.streaming`) instead of in this process's memory."""
    if cfg.streaming:
        from trainers.data.streaming import build_streamed

        if stream_dir is None or purpose != "sft":
            raise ValueError("streaming builds SFT-style data into a directory (stream_dir)")
        return build_streamed(cfg, tokenizer, stream_dir)
    datasets = read_dataset_info(cfg.dataset_info) if cfg.dataset_info else {}
    _load = partial(_load_source, datasets=datasets)
    loaded = [_load(src, cfg, purpose) for src in cfg.train]
    if cfg.eval:
        train_parts = [r.records for r in loaded]
        eval_loaded = [_load(src, cfg, purpose) for src in cfg.eval]
        eval_records = [rec for r in eval_loaded for rec in r.records]
    else:
        parts = [split(r.records, cfg.eval_fraction, cfg.seed) for r in loaded]
        train_parts = [train for train, _ in parts]
        eval_records = [rec for _, held_out in parts for rec in held_out]
        eval_loaded = []
    stats = {"sources": [_source_stats(r) for r in loaded], "eval_sources": [_source_stats(r) for r in eval_loaded]}
    weights = [src.weight for src in cfg.train]
    replay_loaded = [_load(src, cfg, purpose) for src in cfg.replay]
    stats["replay_sources"] = [_source_stats(r) for r in replay_loaded]
    replay_parts = [r.records for r in replay_loaded]
    replay_weights = [src.weight for src in cfg.replay]
    if purpose != "sft":
        train = mix_with_replay(list(zip(train_parts, weights)), list(zip(replay_parts, replay_weights)),
                                 cfg.replay_ratio, cfg.seed)
        stats.update(train_samples=len(train), eval_samples=len(eval_records))
        return Datasets(train, eval_records, stats)

    counts = {"truncated": 0, "dropped_no_labels": 0}
    train_groups = [(encode_records(part, tokenizer, cfg, counts), w) for part, w in zip(train_parts, weights)]
    if not any(group for group, _ in train_groups):
        raise UserError("no training samples left: every one lost all its answer tokens to truncation "
                        f"(max_length {cfg.max_length}, truncation_side {cfg.truncation_side})")
    replay_groups = [(encode_records(part, tokenizer, cfg, counts), w) for part, w in zip(replay_parts, replay_weights)]
    train = mix_with_replay([(g, w) for g, w in train_groups if g], [(g, w) for g, w in replay_groups if g],
                             cfg.replay_ratio, cfg.seed)
    eval_examples = encode_records(eval_records, tokenizer, cfg, counts)
    stats.update(train_samples=len(train), eval_samples=len(eval_examples), **counts,
                 train_tokens=sum(len(e.input_ids) for e in train),
                 trained_tokens=sum(sum(label != IGNORE_INDEX for label in e.labels) for e in train))
    if cfg.packing:
        train, eval_examples = pack(train, cfg.max_length), pack(eval_examples, cfg.max_length)
    stats.update(train_sequences=len(train), eval_sequences=len(eval_examples))
    return Datasets(train, eval_examples, stats)


def _load_source(src: DataSource, cfg: DataConfig, purpose: str, datasets: dict) -> LoadResult:
    return load_records(src.path, fmt=src.format, purpose=purpose, skip_bad_rows=cfg.skip_bad_rows,
                        domain=src.domain, mapped=datasets.get(src.path))


def _source_stats(result: LoadResult) -> dict:
    return {"path": result.path, "format": result.format, "rows": len(result.records),
            "skipped": result.skipped, "errors": result.errors}
