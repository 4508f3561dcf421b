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

from services.ray_llm_compat import DiskMultiplexConfig, LoraModelLoader, ServerBase, get_lora_id, global_id_manager


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


class AdapterServer(ServerBase):
    _adapter_lock: asyncio.Lock | None = None

    async def resolve_adapter(self, load) -> None:
        if self._adapter_lock is None:  # created on the replica's own event loop
            self._adapter_lock = asyncio.Lock()
        async with self._adapter_lock:
            await load()
