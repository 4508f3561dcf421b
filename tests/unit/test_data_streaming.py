"""Streaming data without Ray: files cut into pieces read back exactly as the whole file
reads (rows and line numbers), and the streamed build (`trainers.data.streaming`, its
piece task run in-process here; tests/integration/test_streaming.py runs it on Ray Data)
gives the samples, in the order, that the in-memory build gives."""

from __future__ import annotations

import json
import pickle

import pytest

from trainers.config import DataConfig, DataSource
from trainers.data import build_datasets, synth_rows
from trainers.data.readers import iter_rows, plan_pieces
from trainers.data.streaming import build_streamed, tokenise_piece
from trainers.errors import DataError, UserError


def in_process(rows, **kwargs):
    return [tokenise_piece(row, **kwargs) for row in rows]


def streamed(cfg, tokenizer, out_dir):
    return build_streamed(cfg, tokenizer, out_dir, run_tasks=in_process)


def rows_of(path, pieces):
    return [(line, row if isinstance(row, dict) else str(row)) for piece in pieces for line, row in iter_rows(path, piece)]


def test_jsonl_pieces_read_as_the_whole_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    lines = ['{"text": "a"}', "", '{"text": "b\\u00e9"}', "not json", "[1]", '{"text": "c"}']
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines * 40).encode() + b'\n{"text": "no newline at the end"}')
    whole = rows_of(path, [None])
    for size in (7, 50, 333, 10 ** 6):
        pieces = plan_pieces(path, piece_bytes=size)
        assert pieces[0].start == 0 and pieces[-1].end == path.stat().st_size
        assert all(a.end == b.start for a, b in zip(pieces, pieces[1:]))
        assert rows_of(path, pieces) == whole, size
    assert len(plan_pieces(path, piece_bytes=50)) > 10
    assert whole[-1] == (241, {"text": "no newline at the end"}) and whole[2][1].endswith("rows.jsonl:4: invalid JSON: Expecting value (column 1)")


def test_parquet_pieces_are_runs_of_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(1000)]}), path, row_group_size=64)
    pieces = plan_pieces(path, piece_bytes=1)
    assert len(pieces) == 16 and rows_of(path, pieces) == rows_of(path, [None])
    assert rows_of(path, pieces)[-1] == (1000, {"text": "row 999"})
    assert plan_pieces(tmp_path / "rows.parquet") == [pieces[0].__class__(0, 16, 1)]


@pytest.fixture
def sources(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in synth_rows("small_addition_mixed", 300, seed=1)))
    other = tmp_path / "reverse.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in synth_rows("reverse", 80, seed=2)))
    return chat, other


def test_streamed_samples_and_order_equal_the_in_memory_build(sources, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("trainers.data.readers.PIECE_BYTES", 2000)  # many pieces
    chat, other = sources
    cfg = DataConfig(train=[DataSource(path=str(chat), weight=2.0), DataSource(path=str(other), weight=1.0)],
                     replay=[DataSource(path=str(other))], replay_ratio=0.2, eval=[DataSource(path=str(other))],
                     max_length=40, truncation_side="left")
    memory = build_datasets(cfg, tiny_tokenizer)
    data = streamed(DataConfig(**{**cfg.__dict__, "streaming": True}), tiny_tokenizer, tmp_path / "data")
    assert data.stats["streamed_pieces"] > 10
    assert len(data.train) == len(memory.train) and len(data.eval) == len(memory.eval)
    assert list(data.train) == memory.train and list(data.eval) == memory.eval
    assert list(data.train.lengths()) == [len(e.input_ids) for e in memory.train]
    for key in ("truncated", "dropped_no_labels", "eval_samples"):
        assert data.stats[key] == memory.stats[key], key
    assert [s["rows"] for s in data.stats["sources"]] == [s["rows"] for s in memory.stats["sources"]]
    # What travels to the workers is the file list, whatever the data's size.
    assert len(pickle.dumps(data)) < 10_000
    assert not list(tmp_path.glob("data.partial-*"))


def test_held_out_rows_and_packing(sources, tiny_tokenizer, tmp_path):
    chat, _ = sources
    cfg = DataConfig(train=[DataSource(path=str(chat))], eval_fraction=0.2, max_length=64, streaming=True)
    data = streamed(cfg, tiny_tokenizer, tmp_path / "data")
    every = build_datasets(DataConfig(train=[DataSource(path=str(chat))], eval_fraction=0, max_length=64),
                           tiny_tokenizer).train
    key = sorted(tuple(e.input_ids) for e in every)
    assert sorted(tuple(e.input_ids) for e in [*data.train, *data.eval]) == key
    assert 30 <= len(data.eval) <= 90  # about a fifth of 300
    packed = streamed(DataConfig(**{**cfg.__dict__, "packing": True}), tiny_tokenizer, tmp_path / "packed")
    assert len(packed.train) < len(data.train) / 2
    assert sorted(n for e in packed.train for n in e.seq_lens) == sorted(len(e.input_ids) for e in data.train)


def test_a_bad_row_in_a_later_piece_names_file_line_and_field(sources, tiny_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr("trainers.data.readers.PIECE_BYTES", 2000)
    chat, _ = sources
    lines = chat.read_text().splitlines()
    lines[250] = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    chat.write_text("\n".join(lines) + "\n")
    cfg = DataConfig(train=[DataSource(path=str(chat))], streaming=True)
    with pytest.raises(DataError) as streamed_error:
        streamed(cfg, tiny_tokenizer, tmp_path / "data")
    with pytest.raises(DataError) as memory_error:
        build_datasets(DataConfig(train=[DataSource(path=str(chat))]), tiny_tokenizer)
    assert str(streamed_error.value) == str(memory_error.value)
    assert streamed_error.value.line == 251 and streamed_error.value.field and str(chat) in str(streamed_error.value)
    assert not (tmp_path / "data").exists() and not list(tmp_path.glob("data.partial-*"))
    skipped = streamed(DataConfig(**{**cfg.__dict__, "skip_bad_rows": True}), tiny_tokenizer, tmp_path / "data")
    assert skipped.stats["sources"][0]["skipped"] == 1 and "chat.jsonl:251: field" in skipped.stats["sources"][0]["errors"][0]
    kept = tmp_path / "kept"
    (kept / "data").mkdir(parents=True)
    (kept / "data" / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="is not a streamed build's"):
        streamed(cfg, tiny_tokenizer, kept / "data")
    assert (kept / "data" / "mine.txt").read_text() == "a user's file"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no rows"):
        streamed(DataConfig(train=[DataSource(path=str(empty))], streaming=True), tiny_tokenizer, tmp_path / "e")
