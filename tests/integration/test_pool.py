"""The rollout pool on a real local Ray cluster with the CPU build of vLLM: complete,
ordered results across 2 engines; a killed engine mid-batch is replaced and the batch
still comes back whole; weight sync reaches every engine; an engine killed after a sync
comes back serving the synced weights, replaced once although two callers saw it die."""

import os
import signal
import threading
import time

import pytest
import ray
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


def _sigkill(engine) -> int:
    """SIGKILL the engine actor's own process (a real death, nothing else touched)."""
    pid = ray.get(engine.pid.remote(), timeout=60)
    os.kill(pid, signal.SIGKILL)
    return pid


def _generations(pool):
    return ray.get(pool.owner.generations.remote(), timeout=60)


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
    prompts = [_messages(q) for q in QUESTIONS * 40]  # 960 prompts
    sampling = Sampling(temperature=0.0, max_new_tokens=32)
    expected = pool.generate(prompts, sampling)
    victim = pool.engines[1]
    before = _generations(pool)
    killer = threading.Timer(0.3, lambda: ray.kill(victim, no_restart=True))
    killer.start()
    started = time.time()
    groups = pool.generate(prompts, sampling)
    killer.join()
    assert _generations(pool) == [before[0], before[1] + 1], "the engine was not replaced (kill landed late?)"
    assert [g[0].prompt_index for g in groups] == list(range(len(prompts)))
    assert [g[0].response_ids for g in groups] == [g[0].response_ids for g in expected]
    assert time.time() - started < 300


def _perturbed(tiny_base_dir, seed):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_base_dir))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _trainer_logprobs(model, prompt_ids, response_ids):
    with torch.no_grad():
        out = []
        for p, r in zip(prompt_ids, response_ids):
            logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].log_softmax(-1)
            out.append(logits.gather(1, torch.tensor(r)[:, None]).squeeze(1).tolist())
    return out


def test_weight_sync_reaches_every_engine(pool, tiny_base_dir):
    model = _perturbed(tiny_base_dir, 0)
    report = pool.sync_weights(model.state_dict())
    assert report.bytes > sum(p.numel() for p in model.parameters()) * 4 * 0.9  # float32 tensors, all of them
    assert report.buckets >= 1 and report.seconds >= report.engine_seconds > 0
    prompts = [_messages(q) for q in QUESTIONS[:4]]
    groups = pool.generate(prompts, Sampling(temperature=0.0, max_new_tokens=6))
    prompt_ids = [g[0].prompt_ids for g in groups]
    response_ids = [g[0].response_ids for g in groups]
    assert pool.verify(prompt_ids, response_ids, _trainer_logprobs(model, prompt_ids, response_ids)) < 1e-4


def test_every_engine_confirms_the_version_and_a_tensor_that_arrived_changed_is_named(pool, tiny_base_dir):
    from rollout.weight_sync import SyncError, fingerprint, pack_state

    state = _perturbed(tiny_base_dir, 3).state_dict()
    report = pool.sync_weights(state, version=41)
    assert report.version == 41
    prompts = [_messages(q) for q in QUESTIONS[:4]]  # two per engine
    served = pool.result(pool.submit(prompts, Sampling(temperature=0.0, max_new_tokens=4)))
    assert [g[0].policy_version for g in served] == [41] * 4
    # What the trainer says it sent no longer matches what arrives for one tensor: as if a
    # bucket were corrupted or stale on the way. Both engines refuse it, naming the tensor.
    name = "model.layers.1.mlp.down_proj.weight"
    sent = fingerprint(state) | {name: fingerprint(state)[name] ^ 1}
    refs = [ray.put(b) for b in pack_state(state, 32)]
    assert ray.get(pool.owner.send_weights.remote(refs, sent), timeout=300) == 42  # sent: not yet checked
    with pytest.raises(SyncError, match=rf"engine \d: weight sync incomplete; loaded with other bytes: {name}"):
        ray.get(pool.owner.confirm_sync.remote(), timeout=300)


def test_a_sync_sent_between_two_requests_is_served_between_them(pool, tiny_base_dir):
    """What pipelined rollouts rely on: a sync sent (not waited for) after one request and
    before another reaches every engine between the two, and is confirmed afterwards."""
    start = _perturbed(tiny_base_dir, 5).state_dict()
    version = pool.sync_weights(start, version=50).version
    prompts = [_messages(q) for q in QUESTIONS[:4]]
    sampling = Sampling(temperature=0.0, max_new_tokens=4)
    before = pool.submit(prompts, sampling)
    sent = pool.send_weights(_perturbed(tiny_base_dir, 6).state_dict(), version=version + 1)
    after = pool.submit(prompts, sampling)
    assert [g[0].policy_version for g in pool.result(before)] == [version] * 4
    assert [g[0].policy_version for g in pool.result(after)] == [version + 1] * 4
    report = pool.confirm_sync(sent)
    assert report.version == version + 1 and report.bytes == sent.bytes > 0


def test_an_engine_killed_after_a_sync_comes_back_with_the_synced_weights(pool, tiny_base_dir):
    """Two callers see the killed engine die at once: it is replaced once, and the
    replacement serves the synced (perturbed) weights, not the start model."""
    model = _perturbed(tiny_base_dir, 7)
    pool.sync_weights(model.state_dict())
    prompts = [_messages(q) for q in QUESTIONS[:8]]  # engine 1 serves the second half
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    synced = pool.generate(prompts, greedy)
    start_model = HFEngine(str(tiny_base_dir)).generate(prompts, greedy)
    assert [g[0].response_ids for g in synced[4:]] != [g[0].response_ids for g in start_model[4:]], \
        "the perturbation does not change greedy output: the test could not tell the weights apart"

    before = _generations(pool)
    _sigkill(pool.engines[1])
    results = [None, None]

    def call(k):
        results[k] = pool.generate(prompts, greedy)

    callers = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=600)
    assert _generations(pool) == [before[0], before[1] + 1]  # replaced once, not once per caller
    for result in results:
        assert [g[0].response_ids for g in result] == [g[0].response_ids for g in synced]
    prompt_ids = [g[0].prompt_ids for g in synced]
    response_ids = [g[0].response_ids for g in synced]
    engine_1 = split_evenly(len(prompts), 2)[1]
    gap = pool.verify([prompt_ids[k] for k in engine_1], [response_ids[k] for k in engine_1],
                      _trainer_logprobs(model, [prompt_ids[k] for k in engine_1], [response_ids[k] for k in engine_1]))
    assert gap < 1e-4


def _engine_gap(pool, model, prompts) -> float:
    """Max log-prob gap between every engine and `model` on greedy responses to `prompts`."""
    groups = pool.generate(prompts, Sampling(temperature=0.0, max_new_tokens=8))
    prompt_ids, response_ids = [g[0].prompt_ids for g in groups], [g[0].response_ids for g in groups]
    return pool.verify(prompt_ids, response_ids, _trainer_logprobs(model, prompt_ids, response_ids))


def test_a_replacement_after_a_partial_sync_serves_both_syncs_and_reset_returns_to_the_start(pool, tiny_base_dir):
    """A full sync then one of decoder layer 1 alone: a replacement engine must replay both
    (the partial one alone on the start model would differ); `reset` then brings every
    engine back to the start model for the next run."""
    model = _perturbed(tiny_base_dir, 11)
    pool.sync_weights(model.state_dict())
    layer_1 = {n: p for n, p in model.named_parameters() if ".layers.1." in n}
    assert layer_1, "the tiny model has no decoder layer 1"
    with torch.no_grad():
        for p in layer_1.values():
            p.add_(torch.randn_like(p) * 0.05)
    pool.sync_weights(layer_1)
    prompts = [_messages(q) for q in QUESTIONS[:8]]
    assert _engine_gap(pool, model, prompts) < 1e-4

    before = _generations(pool)
    _sigkill(pool.engines[1])
    assert _engine_gap(pool, model, prompts) < 1e-4  # engine 1's half came from the replacement
    assert _generations(pool) == [before[0], before[1] + 1]

    pool.reset()
    greedy = Sampling(temperature=0.0, max_new_tokens=8)
    start_model = HFEngine(str(tiny_base_dir)).generate(prompts, greedy)
    assert [g[0].response_ids for g in pool.generate(prompts, greedy)] == [g[0].response_ids for g in start_model]
    _sigkill(pool.engines[0])  # a replacement after the reset starts from the start model, not the old syncs
    assert [g[0].response_ids for g in pool.generate(prompts, greedy)] == [g[0].response_ids for g in start_model]
