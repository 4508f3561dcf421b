"""The engine deployment's server: Ray Serve LLM's `LLMServer` (a vLLM engine per
replica) serving rayft's adapters from their directories.

- `LocalAdapterLoader`: `<model_id>:<name>` maps to the directory registered under
  `name`; nothing is downloaded (Ray Serve LLM's own loader fetches from cloud storage).
- `AdapterServer`: loads each adapter into the engine once, even when the first
  requests for it arrive together. The stock server checks "already loaded?" and then
  awaits the load, so two concurrent first requests both load and the second fails
  ("adapter has already been loaded") with a 500; a per-replica lock closes that gap.
"""

from __future__ import annotations

import asyncio

from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.lora_utils import get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.llm import LLMServer


class LocalAdapterLoader(LoraModelLoader):
    def __init__(self, adapters: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.adapters = dict(adapters)

    async def load_model_from_config(self, lora_model_id: str, llm_config) -> DiskMultiplexConfig:
        if lora_model_id not in self.disk_cache:
            name = get_lora_id(lora_model_id)
            if name not in self.adapters:
                raise ValueError(f"unknown adapter '{name}'")
            self.disk_cache[lora_model_id] = DiskMultiplexConfig.model_validate({
                "model_id": lora_model_id, "max_total_tokens": None, "local_path": self.adapters[name],
                "lora_assigned_int_id": global_id_manager.next()})
        return self.disk_cache[lora_model_id]


class AdapterServer(LLMServer):
    _adapter_lock: asyncio.Lock | None = None

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        if self._adapter_lock is None:  # created on the replica's own event loop
            self._adapter_lock = asyncio.Lock()
        async with self._adapter_lock:
            await super()._maybe_resolve_lora_from_multiplex()
