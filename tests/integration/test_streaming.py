"""`data.streaming: true` on the session's Ray cluster: Ray Data tokenises the pieces of
several files into the run directory with the samples and order the in-memory build
gives, and a bad row is reported as the `DataError` a task found (not as a Ray task
failure). A streamed training run, killed mid-way, is in tests/integration/test_resume.py."""

import json

import pytest

from trainers.config import DataConfig, DataSource
from trainers.data import build_datasets, synth_rows
from trainers.errors import DataError


def test_ray_data_builds_what_memory_builds(ray_cluster, tiny_tokenizer, tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr("trainers.data.readers.PIECE_BYTES", 10_000)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps(r) + "\n" for r in synth_rows("small_addition_mixed", 200, seed=3)))
    table = pa.Table.from_pylist(synth_rows("reverse", 300, seed=4))
    pq.write_table(table.select(["messages"]), tmp_path / "reverse.parquet", row_group_size=50)
    cfg = DataConfig(train=[DataSource(path=str(chat)), DataSource(path=str(tmp_path / "reverse.parquet"))],
                     eval=[DataSource(path=str(chat))], max_length=48)
    memory = build_datasets(cfg, tiny_tokenizer)
    streamed = build_datasets(DataConfig(**{**cfg.__dict__, "streaming": True}), tiny_tokenizer,
                              stream_dir=tmp_path / "run" / "data")
    assert streamed.stats["streamed_pieces"] >= 4
    assert list(streamed.train) == memory.train and list(streamed.eval) == memory.eval
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["data"]

    lines = chat.read_text().splitlines()
    lines[180] = json.dumps({"messages": [{"role": "user", "content": 7}]})
    chat.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"chat.jsonl:181: field 'messages\[0\].content'"):
        build_datasets(DataConfig(**{**cfg.__dict__, "streaming": True}), tiny_tokenizer,
                       stream_dir=tmp_path / "run" / "data")
    assert list(streamed.train) == memory.train  # the earlier build is kept when a rebuild fails
