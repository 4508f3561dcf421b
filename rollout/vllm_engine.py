"""The vLLM engine: `vllm.LLM` behind the rollout `Engine` interface, with in-place weight
sync (`rollout.weight_sync.WeightSyncExtension`) and versioned LoRA adapters.

Same conventions as `HFEngine` (see its docstring): logprobs of the sampled tokens under
the raw model distribution (`logprobs_mode="raw_logprobs"`: before temperature and
top-k/top-p), response_ids ending with the stopping token, text without stop strings.

Importing this module imports vLLM but starts nothing: the engine starts in the
constructor. On GPU vLLM runs its engine core and workers in processes of their own
(spawned from the Ray actor). On CPU the engine core and its one worker run inside the
actor's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless the environment sets it): on
these 2-core machines the separate engine-core and worker processes took 27 s to start
against 3.5 s in-process, and the worker spent most of a generation spinning on the
engine core's shared-memory queue, a core the trainer needs (in-process: 396 against 319
tokens/s on 32-token responses, the `bench` preset on 1 thread). Killing the actor then
also ends its engine, with no engine-core process left behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

from rollout.config import RolloutConfig
from rollout.engine import Generation, PromptInput, Sampling, vllm_device_kwargs
from rollout.inputs import check_safetensors, check_sampling, load_tokenizer, prompt_ids
from rollout.vllm_compat import AdapterLogitsProcessor, add_lora, list_loras, remove_lora, shutdown
from rollout.weight_sync import (check_fingerprint, check_names, check_whole_layers, checkpoint_names, payload_names,
                                 sync_groups)

FORCE_KEY = "rayft_force"


class ForceTokens(AdapterLogitsProcessor):
    """Teacher forcing for `VLLMEngine.score`: a request carrying token ids under
    `extra_args["rayft_force"]` can only sample the next of them. Log-probs are reported
    from the raw logits (before any processor), so they are the model's own."""

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        forced = (params.extra_args or {}).get(FORCE_KEY)
        if not forced:
            return None

        def force(output_ids, logits):
            keep = forced[len(output_ids)]
            value = logits[keep].clone()
            logits.fill_(float("-inf"))
            logits[keep] = value
            return logits

        return force


class VLLMEngine:
    def __init__(self, model_dir: str | Path, cfg: RolloutConfig, device: str | None = None):
        check_safetensors(model_dir)
        on_gpu = torch.cuda.is_available() if device is None else device.startswith("cuda")
        if not on_gpu:  # read when the engine starts (see the module docstring)
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.cfg = cfg
        self.tokenizer = load_tokenizer(model_dir)  # the same rendering as HFEngine
        self.weight_names = checkpoint_names(model_dir)
        self.weight_groups = sync_groups(sorted(self.weight_names))
        kwargs = dict(
            model=str(model_dir), seed=cfg.seed, max_model_len=cfg.max_model_len or None, trust_remote_code=False,
            worker_extension_cls="rollout.weight_sync.WeightSyncExtension", logprobs_mode="raw_logprobs",
            enable_lora=cfg.enable_lora, logits_processors=[f"{__name__}:ForceTokens"])
        if cfg.enable_lora:
            kwargs.update(max_lora_rank=cfg.max_lora_rank, max_loras=1)  # one live adapter version
        kwargs.update(vllm_device_kwargs(on_gpu, cfg.dtype, cfg.kv_cache_gb, cfg.tensor_parallel_size,
                                         cfg.gpu_memory_utilization))
        self.llm = LLM(**kwargs)
        self.lora = None  # the current LoRARequest; every generate uses it
        self.adapter_version = 0

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        check_sampling(sampling)
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        params = [self._params(sampling, i) for i in range(len(ids))]
        outputs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False,
                                    lora_request=self.lora)
        groups = []
        for i, (prompt, request) in enumerate(zip(ids, outputs, strict=True)):
            group = []
            for sample in sorted(request.outputs, key=lambda o: o.index):
                response = list(sample.token_ids)
                logprobs = [step[t].logprob for step, t in zip(sample.logprobs, response, strict=True)]
                group.append(Generation(i, sample.index, prompt, response, sample.text, logprobs,
                                        "length" if sample.finish_reason == "length" else "stop"))
            groups.append(group)
        return groups

    def _params(self, s: Sampling, prompt_index: int):
        # vLLM seeds the n samples of one request with seed, seed+1, ...; offsetting each
        # prompt by n keeps repeated prompts in one call from getting identical samples.
        seed = None if s.seed is None else s.seed + prompt_index * s.n
        return SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,  # 0 = off, as vLLM
            max_tokens=s.max_new_tokens, stop=list(s.stop), stop_token_ids=list(s.stop_token_ids),
            seed=seed, logprobs=0)  # 0: just the sampled token's log-prob

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-probs: each response is decoded again with `ForceTokens`
        pinning every step to its token. Not `prompt_logprobs` (one prefill instead of a
        decode step per token) because with LoRA enabled this vLLM crashes computing them
        (the LoRA logits path sizes its indices for sampled tokens: einsum shape error in
        `bgmv_shrink`, vllm-project/vllm#29955); forcing also reuses the exact code path
        that produced the sampling-time log-probs."""
        todo = [i for i, r in enumerate(response_ids) if r]
        params = [SamplingParams(max_tokens=len(response_ids[i]), temperature=0.0, ignore_eos=True, logprobs=0,
                                 detokenize=False, extra_args={FORCE_KEY: list(response_ids[i])}) for i in todo]
        outputs = self.llm.generate([{"prompt_token_ids": list(prompt_ids[i])} for i in todo], params,
                                    use_tqdm=False, lora_request=self.lora)
        scores: list[list[float]] = [[] for _ in response_ids]
        for i, request in zip(todo, outputs, strict=True):
            sample = request.outputs[0]
            assert list(sample.token_ids) == list(response_ids[i]), "forced decoding went off the given tokens"
            scores[i] = [step[t].logprob for step, t in zip(sample.logprobs, sample.token_ids, strict=True)]
        return scores

    def update_weights(self, payload: bytes) -> dict[str, int]:
        """Load one bucket of HF-named weights into every worker, in place; a partial update
        must carry whole decoder layers (see `rollout.weight_sync`). Returns the fingerprint
        of what the workers loaded (one that differs between workers is a `SyncError`)."""
        names = payload_names(payload)
        check_names(names, self.weight_names)
        check_whole_layers(names, self.weight_groups)
        loaded = self.llm.collective_rpc("rayft_load_weights", args=(payload,))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        for rank, worker in enumerate(loaded[1:], start=1):
            check_fingerprint(loaded[0], worker, f"vLLM worker {rank}")
        return loaded[0]

    def load_adapter(self, adapter_dir: str | Path) -> int:
        """Serve a peft LoRA adapter from now on, as a new version (a new LoRA id: vLLM
        caches adapters by id, so reusing one would keep serving the old weights)."""
        if not self.cfg.enable_lora:
            raise ValueError("load_adapter needs rollout.enable_lora: true (vLLM reserves LoRA slots at start-up)")
        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{adapter_dir}: not a peft adapter directory (no adapter_config.json)")
        version = self.adapter_version + 1
        request = LoRARequest(f"rayft-adapter-v{version}", version, str(Path(adapter_dir).resolve()))
        add_lora(self.llm, request)  # load now, so a bad adapter fails here and not mid-rollout
        if version not in list_loras(self.llm):
            raise RuntimeError(f"vLLM did not register adapter {adapter_dir} (LoRA id {version})")
        self.unload_adapter()
        self.lora, self.adapter_version = request, version
        return version

    def unload_adapter(self) -> None:
        """Serve the base model alone again."""
        if self.lora is not None:
            remove_lora(self.llm, self.lora.lora_int_id)
            self.lora = None

    def shutdown(self) -> None:
        """Stop vLLM's engine-core and worker processes now rather than at garbage collection."""
        shutdown(self.llm)
