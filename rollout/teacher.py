"""The teacher actor of on-policy distillation: a frozen causal LM in its own Ray actor
process that scores sampled responses with its next-token distribution (whole, or its top k).

    teacher = start_teacher(model_dir, cpus=1)     # waits until the model has loaded
    rows = ray.get(teacher.logprobs.remote(prompt_ids, response_ids, temperature))
    stop_teacher(teacher)

`rows[i]` is a float32 array (len(response_ids[i]), vocab): the teacher's
log_softmax(logits / temperature) at the positions that predict each response token
(position len(prompt) - 1 + j predicts response token j). At a large vocabulary,
`teacher.top_logprobs.remote(prompt_ids, response_ids, k, temperature)` sends only the k
most likely tokens of each position and the log of the rest's mass. A teacher that fails to load
stays alive and raises that load error from every call, as the reward actor does.

A training run holds its teacher through `TeacherService` (started by the driver, pickled
into every worker): an owner actor restarts a teacher that died and the request is
re-issued, a bounded number of times, then `TeacherError` says why.

    teacher = TeacherService(model_dir, cpus=1, timeout_s=600, max_retries=2)
    rows = teacher.logprobs(prompt_ids, response_ids)
    teacher.stop()
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import numpy as np
import ray

from rollout.actor_owner import OwnedActors
from rollout.inputs import check_safetensors

MAX_BATCH_TOKENS = 8192  # padded tokens per forward pass: bounds the (rows, width, vocab) logits


class TeacherActor:
    """Ray actor body; `start_teacher` creates it with `ray.remote(...)`."""

    def __init__(self, model_dir: str, dtype: str = "auto", trust_remote_code: bool = False,
                 max_batch_tokens: int = MAX_BATCH_TOKENS):
        self.model, self.error = None, None
        self.max_batch_tokens = max_batch_tokens
        try:
            self.model = self._load(model_dir, dtype, trust_remote_code)
        except (OSError, ValueError) as exc:
            self.error = exc  # re-raised by every call: the load error instead of a dead actor

    @staticmethod
    def _load(model_dir: str, dtype: str, trust_remote_code: bool):
        import torch
        from transformers import AutoModelForCausalLM

        check_safetensors(model_dir)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        model = AutoModelForCausalLM.from_pretrained(
            str(Path(model_dir)), dtype=getattr(torch, dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code)
        return model.to(device).requires_grad_(False).eval()

    def _ready(self):
        if self.error is not None:
            raise self.error
        return self.model

    def pid(self) -> int:
        """This actor's process id (fault-injection tests kill exactly this process)."""
        return os.getpid()

    def ready(self) -> int:
        """The teacher's vocabulary size (the width of every row `logprobs` returns)."""
        return self._ready().get_output_embeddings().weight.shape[0]

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                 temperature: float = 1.0) -> list[np.ndarray]:
        """The teacher's log-distribution at each response token; see the module docstring."""
        return self._positions(prompt_ids, response_ids, temperature, lambda logp: logp.cpu().numpy())

    def top_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]], k: int,
                     temperature: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
        """At each response token, the teacher's `k` most likely tokens: per sample a pair
        (log-probs float32 (n, k + 1), token ids int64 (n, k)), the last log-prob column
        being that of every other token together, so each row still sums to one. What
        travels is k + 1 numbers a position instead of a vocabulary's."""
        import torch

        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")

        def top(logp):
            k_ = min(k, logp.shape[-1] - 1)
            values, ids = logp.topk(k_, dim=-1)
            rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), -1, keepdim=True)
            return torch.cat([values, rest], -1).cpu().numpy(), ids.cpu().numpy()

        return self._positions(prompt_ids, response_ids, temperature, top)

    def _positions(self, prompt_ids, response_ids, temperature: float, convert) -> list:
        """`convert(log_softmax(logits / T))` of each sample's response positions, (n, V) each."""
        import torch

        model = self._ready()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
        if any(not p for p in prompt_ids):
            raise ValueError("every prompt needs at least one token (the first response token is predicted from it)")
        out = []
        with torch.inference_mode():
            for chunk in self._batches(rows):
                width = max(len(rows[k]) for k in chunk)
                ids = torch.tensor([rows[k] + [0] * (width - len(rows[k])) for k in chunk], device=model.device)
                mask = torch.tensor([[1] * len(rows[k]) + [0] * (width - len(rows[k])) for k in chunk],
                                    device=model.device)
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                for row, k in enumerate(chunk):
                    start, n = len(prompt_ids[k]) - 1, len(response_ids[k])
                    picked = logits[row, start:start + n].float() / temperature
                    out.append(convert(torch.log_softmax(picked, -1)))
        return out

    def _batches(self, rows: list[list[int]]) -> list[list[int]]:
        """Consecutive row indices grouped so each padded batch stays within max_batch_tokens
        (a longer row goes alone)."""
        batches, current, width = [], [], 0
        for k, row in enumerate(rows):
            wider = max(width, len(row))
            if current and wider * (len(current) + 1) > self.max_batch_tokens:
                batches.append(current)
                current, wider = [], len(row)
            current.append(k)
            width = wider
        return batches + [current] if current else batches


class TeacherError(RuntimeError):
    """The teacher actor was lost and could not be replaced within the retry budget."""


def new_teacher(model_dir: str, cpus: float, dtype: str = "auto", trust_remote_code: bool = False,
                use_gpu: bool = False):
    """A `TeacherActor` handle (not waited on)."""
    remote = ray.remote(num_cpus=cpus, num_gpus=1 if use_gpu else 0)(TeacherActor)
    return remote.remote(str(Path(model_dir).expanduser().resolve()), dtype, trust_remote_code)


def start_teacher(model_dir: str, cpus: float, dtype: str = "auto", trust_remote_code: bool = False,
                  use_gpu: bool = False, timeout_s: float | None = None):
    """A `TeacherActor` on `cpus` CPUs (and one GPU with use_gpu), returned once loaded."""
    actor = new_teacher(model_dir, cpus, dtype, trust_remote_code, use_gpu)
    try:
        ray.get(actor.ready.remote(), timeout=timeout_s)
    except BaseException:
        ray.kill(actor)
        raise
    return actor


def stop_teacher(actor) -> None:
    ray.kill(actor)


class TeacherService:
    """One teacher actor behind an owner actor that restarts it when it dies; `logprobs`
    re-issues the request on the restarted teacher (up to `max_retries` times)."""

    def __init__(self, model_dir: str, cpus: float, dtype: str = "auto", trust_remote_code: bool = False,
                 use_gpu: bool = False, timeout_s: float = 600.0, max_retries: int = 2):
        make = partial(new_teacher, str(model_dir), cpus, dtype, trust_remote_code, use_gpu)
        self.actor = OwnedActors(make, 1, "teacher", TeacherError, timeout_s, max_retries, start_timeout_s=timeout_s)

    def logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]],
                 temperature: float = 1.0) -> list[np.ndarray]:
        """`TeacherActor.logprobs` on the teacher, whichever actor serves it now."""
        return self._call(lambda teacher: teacher.logprobs.remote(prompt_ids, response_ids, temperature), prompt_ids)

    def top_logprobs(self, prompt_ids: list[list[int]], response_ids: list[list[int]], k: int,
                     temperature: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
        """`TeacherActor.top_logprobs` on the teacher, whichever actor serves it now."""
        return self._call(lambda teacher: teacher.top_logprobs.remote(prompt_ids, response_ids, k, temperature),
                          prompt_ids)

    def _call(self, request, prompt_ids) -> list:
        (rows,) = self.actor.call([range(len(prompt_ids))], lambda teacher, _: request(teacher))
        return rows

    def stop(self) -> None:
        self.actor.stop()
