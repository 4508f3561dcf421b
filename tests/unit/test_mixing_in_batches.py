"""Mixing weights and replay ratios show up in the batches the workers actually see."""

from collections import Counter

from trainers.batching import StepBatches, plan_steps
from trainers.config import DataConfig, DataSource
from trainers.data import build_datasets, write_synth


def _domain_share(datasets, steps: int, world: int = 2, batch: int = 8) -> Counter:
    plan = plan_steps(len(datasets.train), batch, 1, world, epochs=1, max_steps=0)
    seen = Counter()
    for rank in range(world):
        batches = StepBatches(plan, rank, seed=0)
        for step in range(steps):
            for ids in batches.micro_batches(step):
                seen.update(datasets.train[i].domain for i in ids)
    total = sum(seen.values())
    return Counter({k: v / total for k, v in seen.items()})


def test_weights_set_batch_composition(tmp_path, tiny_tokenizer):
    math_file = write_synth("addition", 300, tmp_path / "math.jsonl", seed=1)
    text_file = write_synth("reverse", 300, tmp_path / "reverse.jsonl", seed=2)
    cfg = DataConfig(train=[DataSource(path=str(math_file), weight=3.0, domain="math"),
                            DataSource(path=str(text_file), weight=1.0, domain="strings")],
                     eval_fraction=0.1, max_length=48)
    datasets = build_datasets(cfg, tiny_tokenizer)
    share = _domain_share(datasets, steps=20)  # 320 samples seen
    assert abs(share["math"] - 0.75) < 0.06 and abs(share["strings"] - 0.25) < 0.06, share


def test_replay_ratio(tmp_path, tiny_tokenizer):
    new = write_synth("addition", 400, tmp_path / "new.jsonl", seed=1)
    old = write_synth("reverse", 100, tmp_path / "old.jsonl", seed=2)
    cfg = DataConfig(train=[DataSource(path=str(new), domain="new")],
                     replay=[DataSource(path=str(old), domain="replay")], replay_ratio=0.2,
                     eval_fraction=0.1, max_length=48)
    datasets = build_datasets(cfg, tiny_tokenizer)
    counts = Counter(e.domain for e in datasets.train)
    assert counts["new"] == 360  # every training row kept
    assert abs(counts["replay"] / len(datasets.train) - 0.2) < 0.01
    assert {e.domain for e in datasets.eval} == {"new"}  # replay data is not evaluated on
    share = _domain_share(datasets, steps=20)
    assert abs(share["replay"] - 0.2) < 0.06, share
