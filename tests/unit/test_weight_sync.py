"""Packing a state dict into safetensors buckets for weight sync: lossless, size-bounded,
oversize tensors alone, decoder layers never split (vLLM reloads fused layers whole)."""

import pytest
import torch

from rollout.weight_sync import (MIB, SyncError, check_fingerprint, check_names, check_whole_layers, checkpoint_buckets,
                                 fingerprint, pack_state, payload_names, sync_groups, unpack)


def _tensor_bytes(bucket: dict) -> int:
    return sum(t.numel() * t.element_size() for t in bucket.values())


def test_round_trip_keeps_names_dtypes_and_values():
    state = {"embed.weight": torch.randn(16, 8), "norm.weight": torch.randn(8).to(torch.bfloat16),
             "steps": torch.arange(5), "layers.0.q.weight": torch.randn(8, 8)}
    buckets = [unpack(p) for p in pack_state(state, bucket_mb=1)]
    merged = {k: v for b in buckets for k, v in b.items()}
    assert sorted(merged) == sorted(state) and sum(map(len, buckets)) == len(state)
    for name, tensor in state.items():
        assert merged[name].dtype == tensor.dtype and torch.equal(merged[name], tensor)


def test_buckets_respect_the_size_bound():
    state = {f"block{i}.weight": torch.zeros(64, 64) for i in range(40)}  # 16 KiB each
    payloads = pack_state(state, bucket_mb=0.1)  # 102.4 KiB: six tensors per bucket
    buckets = [unpack(p) for p in payloads]
    assert [len(b) for b in buckets] == [6] * 6 + [4]
    assert all(_tensor_bytes(b) <= 0.1 * MIB for b in buckets)
    assert [sorted(payload_names(p)) for p in payloads] == [sorted(b) for b in buckets]


def test_oversize_tensor_goes_alone():
    state = {"a.weight": torch.zeros(100), "embed.weight": torch.zeros(512, 512), "b.weight": torch.zeros(100)}
    buckets = [list(unpack(p)) for p in pack_state(state, bucket_mb=0.5)]  # embed is 1 MiB
    assert buckets == [["a.weight"], ["embed.weight"], ["b.weight"]]


def test_a_decoder_layer_is_never_split():
    names = [f"model.layers.{i}.{part}.weight" for i in range(3)
             for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")]
    state = {"model.embed_tokens.weight": torch.zeros(4, 4), **{n: torch.zeros(64, 64) for n in names},
             "model.norm.weight": torch.zeros(4), "lm_head.weight": torch.zeros(4, 4)}
    assert [len(g) for g in sync_groups(state)] == [1, 5, 5, 5, 1, 1]
    buckets = [list(unpack(p)) for p in pack_state(state, bucket_mb=0.01)]  # smaller than one tensor
    layers = [b for b in buckets if any(".layers." in n for n in b)]
    assert [len(b) for b in layers] == [5, 5, 5]
    assert all(len({n.split(".")[2] for n in b}) == 1 for b in layers)


def test_a_saved_model_travels_whole_with_a_layer_split_across_shards(tmp_path):
    from safetensors.torch import save_file

    layer = {f"model.layers.0.{part}.weight": torch.randn(32, 32) for part in ("self_attn.q_proj", "mlp.up_proj")}
    first = {"model.embed_tokens.weight": torch.randn(8, 4), "model.layers.0.self_attn.q_proj.weight":
             layer["model.layers.0.self_attn.q_proj.weight"]}
    second = {"model.layers.0.mlp.up_proj.weight": layer["model.layers.0.mlp.up_proj.weight"],
              "model.norm.weight": torch.randn(4).to(torch.bfloat16)}
    save_file(first, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file(second, str(tmp_path / "model-00002-of-00002.safetensors"))
    buckets = [unpack(p) for p in checkpoint_buckets(tmp_path, bucket_mb=0.001)]  # smaller than any layer
    merged = {k: v for b in buckets for k, v in b.items()}
    assert sorted(merged) == sorted(first | second)
    assert all(merged[n].dtype == t.dtype and torch.equal(merged[n], t) for n, t in (first | second).items())
    assert sorted(layer) in [sorted(b) for b in buckets]


def test_tied_tensors_can_be_packed():
    shared = torch.randn(8, 4)
    state = {"model.embed_tokens.weight": shared, "lm_head.weight": shared}
    merged = {k: v for p in pack_state(state, bucket_mb=1) for k, v in unpack(p).items()}
    assert torch.equal(merged["lm_head.weight"], shared) and torch.equal(merged["model.embed_tokens.weight"], shared)


def test_unknown_names_are_named():
    check_names(["a", "b"], {"a", "b", "c"})
    with pytest.raises(KeyError, match="model.typo.weight"):
        check_names(["a", "model.typo.weight"], {"a"})


def test_part_of_a_decoder_layer_is_refused():
    groups = sync_groups(["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                          "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight"])
    check_whole_layers(["model.embed_tokens.weight", "model.layers.1.mlp.up_proj.weight"], groups)
    with pytest.raises(ValueError, match="k_proj"):
        check_whole_layers(["model.layers.0.self_attn.q_proj.weight"], groups)


def test_a_fingerprint_names_the_tensor_that_did_not_arrive_or_changed():
    state = {"a.weight": torch.randn(4, 4), "b.weight": torch.randn(3).to(torch.bfloat16), "c.weight": torch.zeros(2)}
    sent = fingerprint(state)
    loaded = {k: v for b in pack_state(state, bucket_mb=1) for k, v in unpack(b).items()}
    check_fingerprint(sent, fingerprint(loaded), "engine 0")
    loaded["b.weight"] = loaded["b.weight"] + 1
    del loaded["c.weight"]
    with pytest.raises(SyncError, match=r"engine 3: .*not loaded: c.weight.*other bytes: b.weight"):
        check_fingerprint(sent, fingerprint(loaded), "engine 3")
