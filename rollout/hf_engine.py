"""The transformers engine: `generate` on a plain (or peft) causal LM. The fallback where
vLLM is not installed, and the reference the vLLM engine is tested against.

Conventions shared with `VLLMEngine` (so the two are interchangeable):
- `Generation.logprobs` are log-probs of the sampled tokens under the unmodified model
  distribution: log_softmax of the raw logits (temperature 1, no top-k/top-p), i.e. what
  a trainer recomputes for PPO ratios and KL, whatever the sampling temperature was.
- response_ids end with the token that stopped generation (eos or a stop id, or the token
  that completed a stop string); the text excludes the stop token and the stop string.
- temperature 0 is greedy; one `Sampling.seed` makes a call reproducible. (Here one RNG
  stream serves the whole call, so a prompt's samples also depend on the other prompts;
  vLLM seeds each prompt on its own. Same seed, same request: same samples, in both.)
"""

from __future__ import annotations

from pathlib import Path

from rollout.engine import Generation, PromptInput, Sampling
from rollout.inputs import check_safetensors, check_sampling, load_tokenizer, prompt_ids
from rollout.weight_sync import check_fingerprint, check_names, fingerprint, unpack

MAX_SEQUENCES = 64  # rows per forward batch (prompts x n): bounds activation memory


class HFEngine:
    def __init__(self, model_dir: str | Path, adapter_dir: str | Path | None = None, dtype: str = "float32",
                 device: str = "cpu", seed: int = 0):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        check_safetensors(model_dir)
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.device = torch.device(device)
        self.tokenizer = load_tokenizer(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False,
        ).to(self.device).eval()
        self.model = self.base  # the peft wrapper once an adapter is loaded
        self.adapter_version = 0
        self._rng = torch.Generator().manual_seed(seed)  # seeds calls that bring no seed
        eos = self.base.generation_config.eos_token_id
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        # generate() fills every setting a call leaves unset from the model's generation
        # config (a shipped repetition_penalty, min_p, top_k...). Only `Sampling` may decide
        # how to sample, as in vLLM, and the log-prob recorder must see raw logits.
        self.base.generation_config = GenerationConfig()
        if adapter_dir:
            self.load_adapter(adapter_dir)

    # -- generation ---------------------------------------------------------------------

    def generate(self, prompts: list[PromptInput], sampling: Sampling) -> list[list[Generation]]:
        import torch

        check_sampling(sampling)
        ids = [prompt_ids(self.tokenizer, p) for p in prompts]
        seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**31 - 1, (1,), generator=self._rng))
        per_batch = max(1, MAX_SEQUENCES // sampling.n)
        out: list[list[Generation]] = []
        # fork_rng: transformers samples from the global RNG; seed it for this call only.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []), torch.inference_mode():
            torch.manual_seed(seed)
            for start in range(0, len(ids), per_batch):
                out.extend(self._generate_batch(ids[start:start + per_batch], start, sampling))
        return out

    def _generate_batch(self, batch: list[list[int]], offset: int, s: Sampling) -> list[list[Generation]]:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        pad = self.tokenizer.pad_token_id
        width = max(map(len, batch))
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=self.device)
        stop_ids = self.eos_ids | set(s.stop_token_ids)
        sampled = s.temperature > 0
        config = GenerationConfig(
            max_new_tokens=s.max_new_tokens, do_sample=sampled, num_return_sequences=s.n,
            temperature=s.temperature if sampled else None, top_p=s.top_p if sampled else None,
            top_k=s.top_k if sampled else None, eos_token_id=sorted(stop_ids), pad_token_id=pad,
            stop_strings=s.stop or None, return_dict_in_generate=True)
        recorder = _RawLogprobRecorder()
        result = self.model.generate(
            input_ids=input_ids, attention_mask=mask, generation_config=config,
            logits_processor=LogitsProcessorList([recorder]), tokenizer=self.tokenizer if s.stop else None)
        new = result.sequences[:, width:]
        logprobs = recorder.result(new).tolist()
        rows = new.tolist()
        groups = []
        for i, prompt in enumerate(batch):
            group = []
            for j in range(s.n):
                row = i * s.n + j  # generate repeats each prompt n times in place
                response, text, reason = self._finish(rows[row], stop_ids, s.stop)
                group.append(Generation(offset + i, j, list(prompt), response, text,
                                        logprobs[row][:len(response)], reason))
            groups.append(group)
        return groups

    def _finish(self, row: list[int], stop_ids: set[int], stops: list[str]) -> tuple[list[int], str, str]:
        """Cut a generated row where vLLM would: after the first stop id, or after the
        token that completes the first stop string (the text ends before the string)."""
        cut = next((k for k, t in enumerate(row) if t in stop_ids), None)
        body = row[:cut] if cut is not None else row
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        found = lambda text: [text.index(x) for x in stops if x in text]  # noqa: E731
        if stops and found(decode(body)):
            lo, hi = 1, len(body)  # shortest prefix whose text holds a stop string
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if found(decode(body[:mid])) else (mid + 1, hi)
            text = decode(body[:lo])
            return body[:lo], text[:min(found(text))], "stop"
        if cut is not None:
            return row[:cut + 1], decode(body), "stop"
        return row, decode(row), "length"

    # -- scoring, weights, adapters -------------------------------------------------------

    def score(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """Teacher-forced log-prob of each response token (raw distribution, as above)."""
        import torch

        rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        out: list[list[float]] = []
        with torch.inference_mode():
            for start in range(0, len(rows), MAX_SEQUENCES):
                chunk = rows[start:start + MAX_SEQUENCES]
                width = max(map(len, chunk))
                ids = torch.tensor([r + [0] * (width - len(r)) for r in chunk], device=self.device)
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in chunk], device=self.device)
                logits = self.model(input_ids=ids, attention_mask=mask).logits.float()
                lp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
                for k, prompt in enumerate(prompt_ids[start:start + len(chunk)]):
                    n_resp = len(chunk[k]) - len(prompt)
                    out.append(lp[k, len(prompt) - 1: len(prompt) - 1 + n_resp].tolist())
        return out

    def update_weights(self, payload: bytes) -> dict[str, int]:
        """Load (part of) the base model's weights, named as in the plain HF model; with an
        adapter loaded the names are mapped onto peft's wrapped modules. The tensors are
        read back from the model and checked; returns the fingerprint of those received."""
        weights = unpack(payload)
        names = {}
        for actual in self.model.state_dict():
            if "lora_" not in actual:
                names[actual.removeprefix("base_model.model.").replace(".base_layer.", ".")] = actual
        if any(".experts." in n and n not in names for n in weights):
            raise ValueError("the transformers engine cannot take a weight sync of this model: it holds its "
                             "MoE experts fused in memory, and syncs travel in the checkpoint's per-expert "
                             "layout; use rollout.engine: vllm")
        check_names(weights, set(names))
        self.model.load_state_dict({names[n]: t for n, t in weights.items()}, strict=False)
        state = self.model.state_dict()
        check_fingerprint(fingerprint({n: t.to(state[names[n]].dtype) for n, t in weights.items()}),
                          fingerprint({n: state[names[n]] for n in weights}), "transformers engine")
        return fingerprint(weights)

    def load_adapter(self, adapter_dir: str | Path) -> int:
        """Wrap the base with a peft LoRA adapter, replacing the previous one."""
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_model.safetensors").is_file():
            raise ValueError(f"{adapter_dir}: no adapter_model.safetensors")
        self.unload_adapter()
        self.model = PeftModel.from_pretrained(self.base, str(adapter_dir), is_trainable=False).eval()
        self.adapter_version += 1
        return self.adapter_version

    def unload_adapter(self) -> None:
        """Serve the base model alone again."""
        if self.model is not self.base:
            self.base = self.model.unload()  # strip the LoRA layers, keep the base weights
            self.model = self.base


class _RawLogprobRecorder:
    """A logits processor that transformers runs before its temperature/top-k/top-p
    warpers, so it sees raw logits. It keeps one step's log_softmax until the next step
    shows which token was sampled: memory for one step, not a whole vocab-by-length tensor."""

    def __init__(self):
        self.pending = None
        self.taken = []

    def __call__(self, input_ids, scores):
        import torch

        if self.pending is not None:
            self.taken.append(self.pending.gather(1, input_ids[:, -1:]).squeeze(1))
        self.pending = torch.log_softmax(scores.float(), -1)
        return scores

    def result(self, new_tokens):
        import torch

        if self.pending is not None:
            self.taken.append(self.pending.gather(1, new_tokens[:, -1:]).squeeze(1))
        return torch.stack(self.taken, 1) if self.taken else new_tokens.new_zeros(new_tokens.shape, dtype=torch.float)
