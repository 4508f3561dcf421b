"""Streaming data (`data.streaming: true`): the sources are read, validated and tokenised
by Ray Data tasks across the cluster, one task per piece of a file (`readers.plan_pieces`),
into Arrow files under the run directory; the driver keeps only counts, so its memory
stays flat whatever the data's size. `ArrowExamples` is the sequence of `Example`s a Ray
Train worker reads from those files, memory-mapped, by index: the loop's batching
(`trainers.batching`) is unchanged, so each worker reads only its own samples of a step,
and a resumed run (which rebuilds the same files) sees exactly the batches an
uninterrupted one would have.

Rows mean what they mean in memory (`trainers.data.load`): a file's format is detected
from its first valid row, on the driver, before any task; a malformed row stops the
build with the `DataError` naming its file, line and field (the earliest such row of the
earliest source), or is skipped and counted with `data.skip_bad_rows`. What differs:
held-out eval rows are picked by a hash of (seed, source, line), about `eval_fraction`
of each source; `packing` packs within a piece. Only SFT-style data streams (methods
sft, cpt and offline distill); the config refuses the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from trainers.data.dataset_info import read_dataset_info
from trainers.data.load import MAX_ERRORS, LoadResult, check_loaded, new_result, parse_rows
from trainers.data.mixing import mix_with_replay, mixed_total
from trainers.data.packing import pack
from trainers.data.readers import Piece, iter_rows, plan_pieces
from trainers.data.records import IGNORE_INDEX, Example
from trainers.data.render import encode_records
from trainers.errors import DataError, UserError

COUNTS = ("truncated", "dropped_no_labels")
MARKER = ".rayft-streamed"  # in every directory a build wrote: only such a directory is replaced
ROLES = ("train", "eval", "replay")


@dataclass(frozen=True)
class Mixing:
    """Index groups (start, count, weight) of the training and replay parts, mixed the
    way `mixing.mix_with_replay` mixes records in memory: the same rows in the same files
    give the order an in-memory build gives them."""
    groups: tuple
    replay: tuple
    ratio: float
    seed: int

    def total(self) -> int:
        return mixed_total(sum(n for _, n, _ in self.groups), self.ratio if self.replay else 0.0)

    def order(self) -> list[int]:
        def ranges(groups):
            return [(range(start, start + n), w) for start, n, w in groups]
        return mix_with_replay(ranges(self.groups), ranges(self.replay), self.ratio, self.seed)


class ArrowExamples(Sequence):
    """The `Example`s of Arrow files `parts` [(name, rows)] under `root`, in `mixing`'s order
    (the files' own when None). Pickles as its file list; each process maps the files on
    first use."""

    def __init__(self, root: str, parts: list[tuple[str, int]], mixing: Optional[Mixing] = None):
        self.root, self.parts, self.mixing = root, parts, mixing

    def __getstate__(self):
        return {"root": self.root, "parts": self.parts, "mixing": self.mixing}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __len__(self) -> int:
        return self.mixing.total() if self.mixing else sum(n for _, n in self.parts)

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = self._order[i] if self._order is not None else i % len(self)
        part = bisect_right(self._starts, row) - 1
        return self._columns[part].example(row - self._starts[part])

    def lengths(self):
        """Every sample's token count, in order (for `batching.length_table`)."""
        import numpy as np

        lengths = np.concatenate([c.lengths for c in self._columns]) if self._columns else np.zeros(0, int)
        return lengths[self._order] if self._order is not None else lengths

    @cached_property
    def _order(self):
        return self.mixing.order() if self.mixing else None

    @cached_property
    def _columns(self) -> list["_PartColumns"]:
        return [_PartColumns(Path(self.root) / name) for name, _ in self.parts]

    @cached_property
    def _starts(self) -> list[int]:
        starts, total = [], 0
        for _, n in self.parts:
            starts.append(total)
            total += n
        return starts


class _PartColumns:
    """One part file memory-mapped, its list columns as numpy views (no copy)."""

    def __init__(self, path: Path):
        import pyarrow as pa

        batch = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
        self.lists = {name: (batch.column(name).offsets.to_numpy(), batch.column(name).values.to_numpy())
                      for name in ("input_ids", "labels", "seq_lens")}
        self.domain, self.truncated = batch.column("domain"), batch.column("truncated").to_numpy(zero_copy_only=False)
        offsets = self.lists["input_ids"][0]
        self.lengths = offsets[1:] - offsets[:-1]

    def example(self, r: int) -> Example:
        ids, labels, seq_lens = (values[offsets[r]:offsets[r + 1]].tolist() for offsets, values in self.lists.values())
        return Example(ids, labels, seq_lens, domain=self.domain[r].as_py(), truncated=bool(self.truncated[r]))


def build_streamed(cfg, tokenizer, out_dir: Path, run_tasks=None):
    """`cfg`'s sources tokenised into `out_dir` (replaced only once the whole build
    succeeded); returns `build.Datasets` of `ArrowExamples`. `run_tasks(rows, **kwargs)`
    runs `tokenise_piece` on every row and returns the results (default: Ray Data, across
    the cluster)."""
    from trainers.data.build import Datasets

    if out_dir.exists() and not (out_dir / MARKER).exists():
        raise UserError(f"{out_dir} exists and is not a streamed build's: move it away (it is never replaced)")
    infos = read_dataset_info(cfg.dataset_info) if cfg.dataset_info else {}
    tasks = [task for role in ROLES for i, src in enumerate(getattr(cfg, role))
             for task in _source_tasks(role, i, src, cfg, infos)]
    for index, task in enumerate(tasks):
        task["index"] = index
    partial = out_dir.with_name(f"{out_dir.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        results = (run_tasks or _on_ray_data)([{"task": json.dumps(t)} for t in tasks], cfg=cfg, tokenizer=tokenizer,
                                              infos=infos, out_dir=str(partial))
        summaries = sorted((json.loads(row["summary"]) for row in results), key=lambda s: s["index"])
        datasets = _assemble(summaries, cfg, Datasets)
        (partial / MARKER).write_text("tokenised samples of this run; rebuilt by every start\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)  # the run's own earlier build, never user data
    partial.rename(out_dir)
    for examples in (datasets.train, datasets.eval):
        examples.root = str(out_dir)
    return datasets


def _on_ray_data(rows: list[dict], **kwargs) -> list[dict]:
    """`tokenise_piece` over `rows` as a Ray Data map, one block (task) per piece."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    return ds.map(tokenise_piece, fn_kwargs=kwargs, num_cpus=1).take_all()


def _source_tasks(role: str, index: int, src, cfg, infos: dict) -> list[dict]:
    mapped = infos.get(src.path)
    result = new_result(src.path, src.format, "sft", mapped)
    if result.format == "auto":  # the first row that parses decides, as in memory
        next(parse_rows(result, iter_rows(result.path), cfg.skip_bad_rows, mapped=mapped), None)
        if result.format == "auto":
            check_loaded(result.path, result.rows, 0, result.errors)
    return [{"role": role, "source": index, "path": result.path, "format": result.format,
             "dataset": src.path if mapped else None, "domain": src.domain,
             "piece": [piece.start, piece.end, piece.first_line] if piece else None}
            for piece in plan_pieces(result.path)]


def tokenise_piece(row: dict, cfg, tokenizer, infos: dict, out_dir: str) -> dict:
    """A Ray Data task: one piece read, parsed and encoded into its part files; returns
    the piece's counts (and the error that stopped it, if one did) as JSON."""
    task = json.loads(row["task"])
    mapped = infos.get(task["dataset"]) if task["dataset"] else None
    result = LoadResult(task["path"], task["format"], [], purpose="sft")
    summary = {"index": task["index"], "role": task["role"], "source": task["source"], "path": task["path"],
               "format": task["format"], "error": None} | dict.fromkeys(COUNTS, 0)
    kept, held_out, line = [], [], [0]

    def tracked(rows):
        for line[0], r in rows:
            yield line[0], r
    try:
        piece = Piece(*task["piece"]) if task["piece"] else None
        for record in parse_rows(result, tracked(iter_rows(task["path"], piece)), cfg.skip_bad_rows,
                                 task["domain"], mapped):
            eval_row = task["role"] == "train" and not cfg.eval and _held_out(cfg, task["source"], line[0])
            (held_out if eval_row else kept).append(record)
    except DataError as e:
        summary["error"] = {"path": e.path, "line": e.line, "problem": e.problem, "field": e.field}
    except UserError as e:
        summary["error"] = {"message": str(e)}
    summary |= {"rows": result.rows, "kept": len(kept) + len(held_out), "skipped": result.skipped,
                "errors": result.errors}
    if summary["error"] is None:  # two parts a piece: its own samples, and those held out for eval
        for part, records in (("main", kept), ("held_out", held_out)):
            summary[part] = _write_part(f"{part}-{task['index']:05d}.arrow", records, tokenizer, cfg,
                                        Path(out_dir), summary, count_tokens=part == "main" and task["role"] != "eval")
    return {"summary": json.dumps(summary)}


def _held_out(cfg, source: int, line: int) -> bool:
    key = f"{cfg.seed}/{source}/{line}".encode()
    return zlib.crc32(key) < cfg.eval_fraction * 2 ** 32


def _write_part(file: str, records: list, tokenizer, cfg, out_dir: Path, counts: dict, count_tokens: bool) -> dict:
    """`records` encoded into `out_dir / file`; their counts go into `counts`. Returns the
    part: {file, samples (before packing), rows (in the file)}."""
    import pyarrow as pa

    examples = encode_records(records, tokenizer, cfg, counts)
    samples = len(examples)
    if count_tokens:
        counts["train_tokens"] = sum(len(e.input_ids) for e in examples)
        counts["trained_tokens"] = sum(sum(label != IGNORE_INDEX for label in e.labels) for e in examples)
    if cfg.packing:
        examples = pack(examples, cfg.max_length)
    if examples:
        ints = pa.list_(pa.int32())
        batch = pa.record_batch({
            "input_ids": pa.array([e.input_ids for e in examples], ints),
            "labels": pa.array([e.labels for e in examples], ints),
            "seq_lens": pa.array([e.seq_lens for e in examples], ints),
            "domain": pa.array([e.domain for e in examples], pa.string()),
            "truncated": pa.array([e.truncated for e in examples], pa.bool_())})
        with pa.OSFile(str(out_dir / file), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)
    return {"file": file, "samples": samples, "rows": len(examples)}


def _assemble(summaries: list[dict], cfg, datasets_class):
    """The pieces' counts into `Datasets`: the first error raised, every file checked as
    in memory, the parts listed in source order."""
    failed = next((s for s in summaries if s["error"]), None)
    if failed:
        error = failed["error"]
        if "message" in error:
            raise UserError(error["message"])
        raise DataError(error["path"], error["line"], error["problem"], error["field"])
    by_source: dict = {}
    for s in summaries:
        by_source.setdefault((ROLES.index(s["role"]), s["source"]), []).append(s)
    stats = {f"{role}_sources" if role != "train" else "sources": [] for role in ROLES}
    groups = {role: [] for role in ROLES}
    train_parts, eval_parts, start = [], [], 0
    for (role_index, _), pieces in sorted(by_source.items()):
        role = ROLES[role_index]
        rows, kept = sum(p["rows"] for p in pieces), sum(p["kept"] for p in pieces)
        errors = [e for p in pieces for e in p["errors"]][:MAX_ERRORS]
        check_loaded(pieces[0]["path"], rows, kept, errors)
        stats["sources" if role == "train" else f"{role}_sources"].append(
            {"path": pieces[0]["path"], "format": pieces[0]["format"], "rows": kept,
             "skipped": sum(p["skipped"] for p in pieces), "errors": errors})
        parts = [(p["main"]["file"], p["main"]["rows"]) for p in pieces]
        eval_parts += [(p["held_out"]["file"], p["held_out"]["rows"]) for p in pieces]
        if role == "eval":
            eval_parts += parts
            continue
        count = sum(n for _, n in parts)
        if count:
            weight = getattr(cfg, role)[pieces[0]["source"]].weight
            groups[role].append((start, count, weight))
            train_parts += parts
            start += count
    if not groups["train"]:
        raise UserError("no training samples left: every one lost all its answer tokens to truncation "
                        f"(max_length {cfg.max_length}, truncation_side {cfg.truncation_side})")
    # Mixed as in memory, so the same rows give the same order there and here.
    mixing = Mixing(tuple(groups["train"]), tuple(groups["replay"]), cfg.replay_ratio, cfg.seed)
    train, evals = ArrowExamples("", _nonempty(train_parts), mixing), ArrowExamples("", _nonempty(eval_parts))
    stats |= {key: sum(s.get(key, 0) for s in summaries) for key in (*COUNTS, "train_tokens", "trained_tokens")}
    stats |= {"train_samples": sum(s["main"]["samples"] for s in summaries if s["role"] != "eval"),
              "eval_samples": sum(s["held_out"]["samples"] + (s["main"]["samples"] if s["role"] == "eval" else 0)
                                  for s in summaries),
              "train_sequences": len(train), "eval_sequences": len(evals), "streamed_pieces": len(summaries)}
    return datasets_class(train, evals, stats)


def _nonempty(parts: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(name, n) for name, n in parts if n]
