"""Both generation engines on the tiny model: the CPU build of vLLM (in a Ray actor, as the
pool runs it) against transformers, in float32. Same greedy tokens, same log-probs (<1e-3),
the same stop/length behaviour, chat input = its rendered token ids, weight sync into the
live vLLM engine, and versioned LoRA adapters matching peft's merged model.

One vLLM engine serves the whole module (start-up takes ~40 s); it has LoRA enabled, the
weight-sync test puts the original weights back, and the LoRA test runs last because the
adapter it loads stays in use.
"""

import time

import pytest
import torch

from rollout.config import RolloutConfig
from rollout.engine import Sampling
from rollout.hf_engine import HFEngine
from rollout.weight_sync import pack_state

QUESTIONS = ["What is 12 + 30?", "Reverse the string abc.", "Say hello to the world.",
             "What is 7 + 8?", "Sort the letters dcba.", "Write a good review."]
GREEDY = Sampling(temperature=0.0, max_new_tokens=16)
TOLERANCE = 1e-3


def chat(question):
    return [{"role": "user", "content": question}]


class _Remote:
    """Calls an actor's methods as if it were local."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name):
        import ray

        return lambda *args, **kwargs: ray.get(getattr(self.actor, name).remote(*args, **kwargs))


@pytest.fixture(scope="module")
def vllm(ray_cluster, tiny_model_dir):
    from rollout.vllm_engine import VLLMEngine

    cfg = RolloutConfig(engine="vllm", max_model_len=256, kv_cache_gb=0.5, enable_lora=True, max_lora_rank=8)
    actor = ray_cluster.remote(num_cpus=1)(VLLMEngine).remote(str(tiny_model_dir), cfg)
    engine = _Remote(actor)
    yield engine
    engine.shutdown()
    ray_cluster.kill(actor)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return HFEngine(str(tiny_model_dir))


def _ids(groups):
    return [[g.response_ids for g in group] for group in groups]


def _max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _hf_score(model, prompt_ids, response_ids):
    """Log-probs straight from a transformers model, one sequence at a time (no padding)."""
    out = []
    with torch.no_grad():
        for p, r in zip(prompt_ids, response_ids):
            ids = torch.tensor([p + r])
            lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            out.append(lp[len(p) - 1:].gather(1, ids[0, len(p):, None]).squeeze(1).tolist())
    return out


def test_greedy_tokens_and_logprobs_match(vllm, hf):
    prompts = [chat(q) for q in QUESTIONS]
    v, h = vllm.generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
    assert [g[0].prompt_index for g in v] == list(range(len(prompts)))
    assert [g[0].prompt_ids for g in v] == [g[0].prompt_ids for g in h]
    assert _ids(v) == _ids(h)
    assert [g[0].text for g in v] == [g[0].text for g in h]
    assert [g[0].finish_reason for g in v] == [g[0].finish_reason for g in h]

    prompt_ids, response_ids = [g[0].prompt_ids for g in v], [g[0].response_ids for g in v]
    reference = hf.score(prompt_ids, response_ids)
    assert _max_diff([g[0].logprobs for g in v], reference) < TOLERANCE  # vLLM sampling-time logprobs
    assert _max_diff([g[0].logprobs for g in h], reference) < TOLERANCE  # HF sampling-time logprobs
    assert _max_diff(vllm.score(prompt_ids, response_ids), reference) < TOLERANCE
    assert _max_diff(reference, _hf_score(hf.model, prompt_ids, response_ids)) < 1e-5  # padding-free check


def test_chat_messages_equal_their_rendered_token_ids(vllm, hf, tiny_tokenizer):
    messages = [chat(q) for q in QUESTIONS[:3]]
    rendered = [tiny_tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    ids = [tiny_tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    for engine in (vllm, hf):
        from_chat, from_ids = engine.generate(messages, GREEDY), engine.generate(ids, GREEDY)
        assert [g[0].prompt_ids for g in from_chat] == ids
        assert _ids(from_chat) == _ids(from_ids)


def test_n_samples_in_order_and_seeded(vllm, hf):
    prompts = [chat(q) for q in QUESTIONS[:3]] * 2  # repeated prompts must still get fresh samples
    sampling = Sampling(n=3, temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=8, seed=7)
    for engine in (vllm, hf):
        first = engine.generate(prompts, sampling)
        assert [[g.sample_index for g in group] for group in first] == [[0, 1, 2]] * len(prompts)
        assert [group[0].prompt_index for group in first] == list(range(len(prompts)))
        assert _ids(engine.generate(prompts, sampling)) == _ids(first)  # same seed, same samples
        samples = [tuple(ids) for group in _ids(first) for ids in group]
        assert len(set(samples)) == len(samples)
        other = engine.generate(prompts, Sampling(**{**sampling.__dict__, "seed": 8}))
        assert _ids(other) != _ids(first)


def test_seeded_sampling_over_more_prompt_tokens_than_one_engine_step_takes(vllm):
    # 64 prompts of about 40 to 170 tokens: more than one engine step of prefill (4096
    # tokens), so some prompt would straddle two steps. With chunked prefill (vLLM's default) a seeded
    # request split that way killed the CPU engine ("CPU Generator does not use offset").
    prompts = [chat(" ".join(["hello world"] * (15 + i))) for i in range(64)]
    sampling = Sampling(temperature=1.0, max_new_tokens=4, seed=11)
    groups = vllm.generate(prompts, sampling)
    assert len(groups) == 64 and all(len(group[0].response_ids) >= 1 for group in groups)
    assert sum(len(group[0].prompt_ids) for group in groups) > 4096 + 1000
    assert _ids(vllm.generate(prompts, sampling)) == _ids(groups)  # still seeded: same samples again


def _stop_string(text: str) -> str:
    """Three printable ASCII characters from the second half of `text` (a byte-fallback
    token decodes to U+FFFD, which incremental detokenizers may hold back)."""
    for start in range(len(text) // 2, len(text) - 2):
        piece = text[start:start + 3]
        if piece.isascii() and piece.strip() == piece and piece.isprintable():
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_stop_ids_and_length(vllm, hf):
    prompts = [chat(q) for q in QUESTIONS[:3]]
    free = [g[0] for g in hf.generate(prompts, GREEDY)]
    assert all(g.finish_reason == "length" for g in free), "the tiny model should not stop by itself here"
    stops = [_stop_string(g.text) for g in free]  # one list for all prompts: the first hit counts
    decode = lambda ids: hf.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    for engine in (vllm, hf):
        stopped = [g[0] for g in engine.generate(prompts, Sampling(temperature=0.0, max_new_tokens=16, stop=stops))]
        for full, out in zip(free, stopped):
            cut = min(full.text.find(s) for s in stops if s in full.text)
            assert out.text == full.text[:cut] and out.finish_reason == "stop"
            assert out.response_ids == full.response_ids[:len(out.response_ids)]
            # the response ends with the token that completed the stop string
            assert any(s in decode(out.response_ids) for s in stops)
            assert not any(s in decode(out.response_ids[:-1]) for s in stops)

        stop_id = free[0].response_ids[5]
        k = free[0].response_ids.index(stop_id)
        by_id = engine.generate(prompts[:1], Sampling(temperature=0.0, max_new_tokens=16,
                                                      stop_token_ids=[stop_id]))[0][0]
        assert by_id.response_ids == free[0].response_ids[:k + 1] and by_id.finish_reason == "stop"
        assert by_id.text == decode(free[0].response_ids[:k]) and len(by_id.logprobs) == k + 1

        short = [g[0] for g in engine.generate(prompts, Sampling(temperature=0.0, max_new_tokens=5))]
        assert [g.response_ids for g in short] == [g.response_ids[:5] for g in free]
        assert {g.finish_reason for g in short} == {"length"}


def test_hf_ignores_the_models_shipped_sampling_defaults(hf, tiny_model_dir, tmp_path):
    """Only `Sampling` decides how to sample (as in vLLM): a generation_config.json asking
    for a repetition penalty must change neither tokens nor (raw) log-probs."""
    import json
    import shutil

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 3.0, "top_k": 5}))
    prompts = [chat(q) for q in QUESTIONS[:2]]
    ours, reference = HFEngine(str(model_dir)).generate(prompts, GREEDY), hf.generate(prompts, GREEDY)
    assert _ids(ours) == _ids(reference)
    assert _max_diff([g[0].logprobs for g in ours], [g[0].logprobs for g in reference]) < 1e-6


def test_bad_weight_updates_are_refused(vllm, hf):
    unknown = pack_state({"model.no_such_layer.weight": torch.zeros(2)}, bucket_mb=1)[0]
    for engine in (vllm, hf):
        with pytest.raises(KeyError, match="no_such_layer"):
            engine.update_weights(unknown)
    # vLLM would rebuild its fused qkv weight from q alone (NaN logits): refused up front
    q_only = pack_state({"model.layers.0.self_attn.q_proj.weight": torch.zeros(128, 128)}, bucket_mb=1)[0]
    with pytest.raises(ValueError, match="whole decoder layers"):
        vllm.update_weights(q_only)


def test_weight_sync_into_live_engine(vllm, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompts = [chat(q) for q in QUESTIONS]
    before = vllm.generate(prompts, GREEDY)
    prompt_ids, fixed = [g[0].prompt_ids for g in before], [g[0].response_ids for g in before]

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    buckets = pack_state(model.state_dict(), bucket_mb=0.25)
    assert len(buckets) >= 4
    start = time.perf_counter()
    for bucket in buckets:
        vllm.update_weights(bucket)
    seconds = time.perf_counter() - start
    print(f"\nweight sync: {len(buckets)} buckets, {sum(map(len, buckets)) / 2**20:.2f} MiB, {seconds:.3f} s")

    try:
        assert _max_diff(vllm.score(prompt_ids, fixed), _hf_score(model, prompt_ids, fixed)) < TOLERANCE
        after = vllm.generate(prompts, GREEDY)
        perturbed = HFEngine(str(tiny_model_dir))
        for bucket in buckets:
            perturbed.update_weights(bucket)
        assert _ids(after) == _ids(perturbed.generate(prompts, GREEDY))
        assert _ids(after) != _ids(before)
        assert _max_diff([g[0].logprobs for g in after],
                         _hf_score(model, prompt_ids, [g[0].response_ids for g in after])) < TOLERANCE
    finally:
        for bucket in pack_state(original, bucket_mb=1):
            vllm.update_weights(bucket)
    assert _ids(vllm.generate(prompts, GREEDY)) == _ids(before)


def _adapter(base_dir, out_dir, seed):
    """A peft LoRA adapter whose lora_B is non-zero, so it changes the output."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"])
    model = get_peft_model(model, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.save_pretrained(out_dir)
    return out_dir


def _merged(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def test_lora_adapter_versions(vllm, hf, tiny_model_dir, tmp_path):
    prompts = [chat(q) for q in QUESTIONS]
    base = vllm.generate(prompts, GREEDY)
    seen = [_ids(base)]
    for version, seed in ((1, 1), (2, 2)):
        adapter = _adapter(tiny_model_dir, tmp_path / f"v{version}", seed)
        assert vllm.load_adapter(str(adapter)) == version
        assert hf.load_adapter(str(adapter)) == version
        out = vllm.generate(prompts, GREEDY)
        assert _ids(out) == _ids(hf.generate(prompts, GREEDY))
        merged = _merged(tiny_model_dir, adapter)
        prompt_ids, response_ids = [g[0].prompt_ids for g in out], [g[0].response_ids for g in out]
        reference = _hf_score(merged, prompt_ids, response_ids)
        assert _max_diff([g[0].logprobs for g in out], reference) < TOLERANCE
        assert _max_diff(vllm.score(prompt_ids, response_ids), reference) < TOLERANCE
        assert _ids(out) not in seen  # differs from the base and from the previous version
        seen.append(_ids(out))
