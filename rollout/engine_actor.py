"""The engine actor: one generation engine (vLLM or transformers) in its own Ray actor
process, remembering the weights and adapter it serves so a replacement can be brought
to the same state."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import ray

from rollout.config import RolloutConfig
from rollout.engine import Generation, PromptInput, Sampling


def _scratch_dir() -> str | None:
    """Where synced adapters are written: memory-backed /dev/shm where there is one."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def resolve_engine_kind(kind: str) -> str:
    """`auto` is vLLM where it is installed, transformers otherwise."""
    if kind != "auto":
        return kind
    try:
        import vllm  # noqa: F401
        return "vllm"
    except ImportError:
        return "hf"


def build_engine(kind: str, model_dir: str, cfg: RolloutConfig, adapter_dir: str | None = None):
    if resolve_engine_kind(kind) == "vllm":
        from rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(model_dir, cfg)
        if adapter_dir:
            engine.load_adapter(adapter_dir)
        return engine
    from rollout.hf_engine import HFEngine

    return HFEngine(model_dir, adapter_dir=adapter_dir, dtype="float32" if cfg.dtype == "auto" else cfg.dtype,
                    seed=cfg.seed)


class EngineActor:
    """Ray actor body; the pool's owner (`rollout.pool_owner`) creates these with `ray.remote(...)`.
    It runs one call at a time, in the order the owner sent them, so a weight update sent
    after a generate request reaches the engine between requests, never during one."""

    def __init__(self, kind: str, model_dir: str, cfg: RolloutConfig, adapter_dir: str | None = None):
        self.engine = build_engine(kind, model_dir, cfg, adapter_dir)
        self.version = 0  # the weight sync served now (0: the start model)
        self.synced_adapter: Path | None = None  # the directory of the adapter a sync sent

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        """This actor's process id (fault-injection tests kill exactly this process)."""
        return os.getpid()

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        groups = self.engine.generate(prompts, sampling)
        for group in groups:
            for generation in group:
                generation.policy_version = self.version
        return groups

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        return self.engine.score(prompt_ids, response_ids)

    def update_weights(self, bucket_refs: list, version: int, sent: dict[str, int], where: str) -> dict:
        """Load every bucket (ObjectRefs of safetensors bytes) and check that what was loaded
        is what was `sent` (a fingerprint, `rollout.weight_sync`); `where` names this engine
        in a `SyncError`. Returns the version now served, the tensors loaded and the seconds."""
        from rollout.weight_sync import check_fingerprint

        start = time.perf_counter()
        loaded: dict[str, int] = {}
        for ref in bucket_refs:
            loaded.update(self.engine.update_weights(ray.get(ref)))
        check_fingerprint(sent, loaded, where)
        self.version = version
        return {"version": version, "tensors": len(loaded), "seconds": time.perf_counter() - start}

    def load_checkpoint(self, model_dir: str, bucket_mb: float, adapter_dir: str | None = None) -> dict:
        """Back to a saved model's weights (every tensor, bucket by bucket, as a sync would)
        and `adapter_dir` (or no adapter), as version 0."""
        from rollout.weight_sync import checkpoint_buckets

        start = time.perf_counter()
        tensors = sum(len(self.engine.update_weights(payload)) for payload in checkpoint_buckets(model_dir, bucket_mb))
        if adapter_dir:
            self.engine.load_adapter(adapter_dir)
        else:
            self.engine.unload_adapter()
        self._drop_synced_adapter()
        self.version = 0
        return {"version": 0, "tensors": tensors, "seconds": time.perf_counter() - start}

    def load_adapter_tensors(self, payload: bytes, adapter_config: dict, version: int, sent: dict[str, int],
                             where: str) -> dict:
        """Serve a LoRA adapter sent as tensors (a safetensors payload; Ray resolves the
        object ref passed for it) as weight version `version`, on the unchanged base. The engines load adapters from
        a directory, so it is written to a private one first (in memory where /dev/shm is),
        checked against the fingerprint `sent` as written, and kept while it is served
        (vLLM may re-read it)."""
        from rollout.weight_sync import check_fingerprint, fingerprint, unpack

        start = time.perf_counter()
        directory = Path(tempfile.mkdtemp(prefix=f"rayft-adapter-v{version}-", dir=_scratch_dir()))
        try:
            from safetensors.torch import load_file, save_file

            save_file(unpack(payload), str(directory / "adapter_model.safetensors"))
            (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
            written = load_file(str(directory / "adapter_model.safetensors"))
            check_fingerprint(sent, fingerprint(written), where)
            self.engine.load_adapter(str(directory))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._drop_synced_adapter()
        self.synced_adapter, self.version = directory, version
        return {"version": version, "tensors": len(written), "seconds": time.perf_counter() - start}

    def _drop_synced_adapter(self) -> None:
        if self.synced_adapter is not None:
            shutil.rmtree(self.synced_adapter, ignore_errors=True)
            self.synced_adapter = None

    def load_adapter(self, adapter_dir: str) -> int:
        return self.engine.load_adapter(adapter_dir)
