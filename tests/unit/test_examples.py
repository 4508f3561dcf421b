"""Every shipped example config loads and validates, and starts with its command."""

from pathlib import Path

import pytest

from cluster.config import load_config

EXAMPLES = sorted(Path(__file__).resolve().parents[2].joinpath("examples").glob("*.yaml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads(path):
    config = load_config(path)
    assert config.method
    head = path.read_text().splitlines()[:6]
    assert any(line.startswith("#") and f"rayft train examples/{path.name}" in line for line in head)
