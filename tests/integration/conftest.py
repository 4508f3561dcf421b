"""Integration fixtures (the session's Ray cluster, `ray_cluster`, is in tests/conftest.py)."""

import pytest


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory):
    from trainers.data import write_synth

    return write_synth("addition", 640, tmp_path_factory.mktemp("data") / "addition.jsonl", seed=0)
