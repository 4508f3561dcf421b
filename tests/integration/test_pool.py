"""The rollout pool on a real local Ray cluster with the CPU build of vLLM: complete,
ordered results across 2 engines; a killed engine mid-batch is replaced and the batch
still comes back whole; weight sync reaches every engine."""

import threading
import time

import pytest
import torch

from rollout.config import RolloutConfig
from rollout.engine import Sampling
from rollout.hf_engine import HFEngine
from rollout.pool import RolloutPool, split_evenly

QUESTIONS = [f"What is {a} + {b}?" for a, b in zip(range(10, 34), range(40, 64))]


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_base_dir):
    pool = RolloutPool(str(tiny_base_dir), RolloutConfig(engine="vllm", num_engines=2, max_model_len=256,
                                                         kv_cache_gb=0.5))
    yield pool
    pool.shutdown()


def _messages(question):
    return [{"role": "user", "content": question}]


def test_split_evenly():
    assert [len(r) for r in split_evenly(10, 3)] == [4, 3, 3]
    assert [len(r) for r in split_evenly(1, 2)] == [1, 0]


def test_two_engines_return_every_prompt_in_order(pool, tiny_base_dir):
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    groups = pool.generate([_messages(q) for q in QUESTIONS], greedy)
    assert [g[0].prompt_index for g in groups] == list(range(len(QUESTIONS)))
    reference = HFEngine(str(tiny_base_dir)).generate([_messages(q) for q in QUESTIONS], greedy)
    assert [g[0].response_ids for g in groups] == [r[0].response_ids for r in reference]

    sampled = pool.generate([_messages(q) for q in QUESTIONS[:6]], Sampling(n=3, temperature=1.0, max_new_tokens=8,
                                                                            seed=1))
    assert [[g.sample_index for g in group] for group in sampled] == [[0, 1, 2]] * 6


def test_killed_engine_mid_batch_still_returns_the_batch(pool):
    import ray

    prompts = [_messages(q) for q in QUESTIONS * 40]  # 960 prompts
    sampling = Sampling(temperature=0.0, max_new_tokens=32)
    expected = pool.generate(prompts, sampling)
    victim = pool.engines[1]
    killer = threading.Timer(0.3, lambda: ray.kill(victim, no_restart=True))
    killer.start()
    started = time.time()
    groups = pool.generate(prompts, sampling)
    killer.join()
    assert pool.engines[1] is not victim, "the engine was not replaced (kill landed after the batch?)"
    assert [g[0].prompt_index for g in groups] == list(range(len(prompts)))
    assert [g[0].response_ids for g in groups] == [g[0].response_ids for g in expected]
    assert time.time() - started < 300


def test_weight_sync_reaches_every_engine(pool, tiny_base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    report = pool.sync_weights(model.state_dict())
    assert report.bytes > 0 and report.seconds > 0
    prompts = [_messages(q) for q in QUESTIONS[:4]]
    groups = pool.generate(prompts, Sampling(temperature=0.0, max_new_tokens=6))
    prompt_ids = [g[0].prompt_ids for g in groups]
    response_ids = [g[0].response_ids for g in groups]
    with torch.no_grad():
        trainer = []
        for p, r in zip(prompt_ids, response_ids):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].log_softmax(-1)
            trainer.append(logits.gather(1, torch.tensor(r)[:, None]).squeeze(1).tolist())
    assert pool.verify(prompt_ids, response_ids, trainer) < 1e-3
