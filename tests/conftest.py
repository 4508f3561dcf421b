"""Shared fixtures: one real local Ray cluster for the session, and a tiny model and
tokenizer built in-process (no network, no hub)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller looks at its workers every 2 s by default, so a finished or failed
# run is noticed up to 2 s late; the suite runs dozens of short runs.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Llama with its BPE tokenizer, saved like any transformers model."""
    from trainers.models import build_model

    return build_model("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from trainers.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory):
    """The tiny model briefly pre-trained on the built-in corpus: a weak but real LM, as
    adapter methods (LoRA & co.) expect their frozen base to be."""
    from trainers.models import build_model

    return build_model("tiny", tmp_path_factory.mktemp("models") / "tiny-base", pretrain_steps=150)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole session: the integration tests drive it from
    this process, and e2e runs that need no cluster of their own join it (`ray_address`)."""
    import ray

    from cluster.ray_env import ensure_ray

    ensure_ray(num_cpus=4)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_cluster) -> str:
    """The session cluster's address, for a `rayft` subprocess's RAY_ADDRESS."""
    return ray_cluster.get_runtime_context().gcs_address
