"""Weight sync, receiving side: how trainer weights travel to the rollout engines.

The trainer packs its (full, gathered) state dict into size-bounded safetensors byte
buckets with `pack_state`; each bucket goes to every engine (`Engine.update_weights`),
through Ray's object store on CPU. Bytes rather than tensors because vLLM's
`collective_rpc` turns tensor arguments into nested lists on the way to its workers.

Inside vLLM, `WeightSyncExtension` is mixed into every worker
(`LLM(worker_extension_cls="rollout.weight_sync.WeightSyncExtension")`) and loads a bucket
with the worker's `reload_weights`, which reloads in checkpoint (HF) format and then
re-runs the per-layer post-processing (on CPU the linear weights are repacked for the
CPU kernels, which is why a plain `model.load_weights` leaves them stale).

Each bucket is one reload, and vLLM rebuilds a fused layer (q/k/v -> qkv_proj,
gate/up -> gate_up_proj, the experts of an MoE layer) only from a complete set of its
parts within one reload: a part missing from the call is left uninitialised. So buckets
never split a decoder layer: all tensors under `...layers.<i>.` travel together (the
grouping vLLM's own `layerwise_groups` uses); other tensors (embeddings, final norm,
lm_head) are groups of one. The same holds for a partial update: it must carry whole
decoder layers, which `VLLMEngine.update_weights` checks (`check_whole_layers`).

GPU: the fast path would be NCCL, through vLLM's weight-transfer API
(`LLM(weight_transfer_config={"backend": "nccl"})`, then `init_weight_transfer_engine`,
`start_weight_update` / `update_weights` / `finish_weight_update` on the engine and
`vllm.distributed.weight_transfer.nccl_engine.NCCLTrainerWeightTransferEngine` on
trainer rank 0). That is NOT implemented here: the CPU build cannot exercise it, and
untested NCCL plumbing is worse than none. The byte buckets should work on GPU too (the
weight loaders copy the CPU tensors onto the device), only slower; not tried here, as
there is no GPU build of vLLM in this environment.

Every sync carries a version and a fingerprint (a CRC-32 of each tensor's bytes, taken
by the trainer from its own state dict): each engine fingerprints what it loaded (vLLM:
what every worker handed to its loader; transformers: the model's tensors read back after
loading) and `check_fingerprint` names any tensor that is missing or differs, so a sync
that did not arrive whole fails the step instead of leaving stale weights unnoticed.

Bucket size: on CPU, syncing a 128 MiB model took 1.6 s as one bucket and 0.4 s as
32 MiB buckets (large collective_rpc messages take vLLM's slower overflow path).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Iterator, Mapping

MIB = 1 << 20


def sync_groups(names: Iterable[str]) -> list[list[str]]:
    """Names grouped so that no group splits a decoder layer (see the module docstring);
    groups keep the order in which their first name appears."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        key = ".".join(parts[: index + 1]) if index is not None else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def fingerprint(tensors: Mapping) -> dict[str, int]:
    """CRC-32 of each tensor's bytes (dtype and layout as stored), by name."""
    import zlib

    import torch

    return {name: zlib.crc32(t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().data)
            for name, t in tensors.items() if isinstance(t, torch.Tensor)}


class SyncError(RuntimeError):
    """An engine did not load what a weight sync sent."""


def check_fingerprint(sent: Mapping[str, int], loaded: Mapping[str, int], where: str) -> None:
    """Every tensor sent was loaded with the same bytes; else a `SyncError` naming `where`
    (the engine) and the tensors."""
    missing = sorted(set(sent) - set(loaded))
    differ = sorted(n for n in sent if n in loaded and loaded[n] != sent[n])
    if missing or differ:
        parts = [f"{label} {', '.join(names[:3])}" + (f" (and {len(names) - 3} more)" if len(names) > 3 else "")
                 for label, names in (("not loaded:", missing), ("loaded with other bytes:", differ)) if names]
        raise SyncError(f"{where}: weight sync incomplete; {'; '.join(parts)}")


def pack_state(state_dict: Mapping, bucket_mb: float) -> list[bytes]:
    """Safetensors buckets of at most `bucket_mb` MiB of tensor data each (plus a small
    header); a group (decoder layer, or a single tensor) larger than that goes alone."""
    import torch

    tensors = {name: t.detach().to("cpu").contiguous() for name, t in state_dict.items()
               if isinstance(t, torch.Tensor)}
    return list(_buckets(sync_groups(tensors), tensors.__getitem__, bucket_mb))


def checkpoint_buckets(model_dir: str | Path, bucket_mb: float) -> Iterator[bytes]:
    """A saved HF model's weights as `pack_state` buckets, read a bucket at a time (a decoder
    layer split across shard files still travels whole)."""
    from safetensors import safe_open

    handles = [safe_open(str(f), framework="pt") for f in sorted(Path(model_dir).glob("*.safetensors"))]
    where = {name: handle for handle in handles for name in handle.keys()}
    yield from _buckets(sync_groups(sorted(where)), lambda name: where[name].get_tensor(name), bucket_mb)


def _buckets(groups: list[list[str]], tensor, bucket_mb: float) -> Iterator[bytes]:
    """Groups packed in order into buckets of at most `bucket_mb` MiB (a larger group goes
    alone); `tensor(name)` gives each tensor when its bucket is built."""
    from safetensors.torch import save

    bound = bucket_mb * MIB
    current, size = {}, 0
    for group in groups:
        tensors = {n: tensor(n) for n in group}
        group_size = sum(t.numel() * t.element_size() for t in tensors.values())
        if current and size + group_size > bound:
            yield save(_unshare(current))
            current, size = {}, 0
        current.update(tensors)
        size += group_size
    if current:
        yield save(_unshare(current))


def _unshare(bucket: dict) -> dict:
    """safetensors refuses tensors sharing storage (tied embeddings): copy the repeats."""
    seen, out = set(), {}
    for name, tensor in bucket.items():
        ptr = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if ptr in seen else tensor
        seen.add(ptr)
    return out


def unpack(payload: bytes) -> dict:
    """The tensors of one bucket, by name."""
    from safetensors.torch import load

    return load(bytes(payload))


def payload_names(payload: bytes) -> list[str]:
    """Tensor names in a bucket, read from the safetensors header only (no tensor data)."""
    (header_len,) = struct.unpack("<Q", payload[:8])
    header = json.loads(bytes(payload[8: 8 + header_len]))
    return [name for name in header if name != "__metadata__"]


def checkpoint_names(model_dir: str | Path) -> set[str]:
    """Tensor names of a saved HF model, from its safetensors headers (no data read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in Path(model_dir).glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("tie_word_embeddings"):
        names.add("lm_head.weight")  # in a trainer's state dict though not in the file
    return names


def check_names(names: Iterable[str], known: set[str]) -> None:
    """A name the model does not have is a caller bug (wrong prefix, a peft name...);
    fail loudly rather than silently load nothing."""
    unknown = sorted(set(names) - known)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise KeyError(f"weight update names not in the model: {', '.join(unknown[:5])}{more}")


def check_whole_layers(names: Iterable[str], groups: list[list[str]]) -> None:
    """vLLM cannot reload part of a decoder layer (see the module docstring): a q_proj
    sent without k_proj/v_proj leaves the fused qkv weight uninitialised (NaN logits,
    which a later full reload did not repair when tried here). Refuse such a bucket up front."""
    names = set(names)
    for group in groups:
        missing = [n for n in group if n not in names]
        if missing and len(missing) < len(group):
            raise ValueError(f"a weight update must carry whole decoder layers; missing {', '.join(missing[:3])}"
                             + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""))


class WeightSyncExtension:
    """Mixed into vLLM's worker class; its methods are called with
    `llm.collective_rpc("rayft_load_weights", args=(payload,))` and run on every worker
    (each tensor-parallel rank loads its own shard). Names carry a `rayft_` prefix because
    vLLM refuses an extension whose attribute names clash with the worker's (the worker
    already has `update_weights`, for its own weight-transfer API)."""

    def rayft_load_weights(self, payload: bytes) -> dict[str, int]:
        """Load one bucket; returns the fingerprint of the tensors handed to the loader."""
        from rollout.vllm_compat import reload_weights  # here: trainers import this module, never vLLM

        weights = unpack(payload)
        # The worker's reload_weights = checkpoint-format load + per-layer repacking; it
        # also drops loaded LoRA adapters (they are re-read from disk on next use).
        reload_weights(self, weights)
        return fingerprint(weights)
