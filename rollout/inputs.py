"""What every engine does to its inputs before generating: load the model's tokenizer,
render prompts to token ids, validate sampling settings. Both engines use these, so a chat
prompt becomes the same token ids whichever engine serves it."""

from __future__ import annotations

from pathlib import Path

from rollout.engine import PromptInput, Sampling


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_ids(tokenizer, prompt: PromptInput) -> list[int]:
    """Token ids as given, or chat messages rendered with the model's chat template and a
    generation prompt (the assistant turn opener)."""
    if not prompt:
        raise ValueError("empty prompt")
    if all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt):
        encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)
        return list(encoded["input_ids"])
    raise TypeError("a prompt is a list of token ids or a list of {role, content} messages")


def check_sampling(s: Sampling) -> None:
    if s.n < 1 or s.max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1 (got n={s.n}, max_new_tokens={s.max_new_tokens})")
    if s.temperature < 0 or not 0 < s.top_p <= 1 or s.top_k < 0:
        raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                         f"(got {s.temperature}, {s.top_p}, {s.top_k})")


def check_safetensors(model_dir: str | Path) -> None:
    """Engines load safetensors only: a pickle checkpoint can run code when loaded."""
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{model_dir}: no *.safetensors weights (pickle checkpoints are not loaded)")
