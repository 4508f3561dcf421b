"""Integration fixtures: one real local Ray cluster per test session."""

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    from cluster.ray_env import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def addition_data(tmp_path_factory):
    from trainers.data import write_synth

    return write_synth("addition", 640, tmp_path_factory.mktemp("data") / "addition.jsonl", seed=0)
