"""Every shipped example config loads and validates, and starts with its command."""

from pathlib import Path

import pytest

from cluster.config import load_config

ALL = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))
SERVE_EXAMPLES = [p for p in ALL if p.name.startswith("serve")]
EXAMPLES = [p for p in ALL if p not in SERVE_EXAMPLES]
TUNE_EXAMPLES = [p for p in EXAMPLES if p.name.startswith("tune")]


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path):
    config = load_config(path)
    assert config.method
    head = path.read_text().splitlines()[:6]
    command = "tune" if path in TUNE_EXAMPLES else "train"
    assert any(line.startswith("#") and f"rayft {command} examples/{path.name}" in line for line in head)
    if path in TUNE_EXAMPLES:
        assert config.tune.distributions(), "a tune example searches something"


@pytest.mark.parametrize("path", SERVE_EXAMPLES, ids=lambda p: p.name)
def test_serve_example_loads(path):
    from cluster.cli import parse_args
    from cluster.serve import load_serve_config

    config = load_serve_config(parse_args(["serve", "runs/x", "--config", str(path)]))
    assert config.model == "runs/x"
    head = path.read_text().splitlines()[:6]
    assert any(line.startswith("#") and "rayft serve" in line and f"--config examples/{path.name}" in line
               for line in head)
