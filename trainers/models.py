"""Local models: build random models of any supported family (`trainers.families`) with a
trained BPE tokenizer, and load models and tokenizers safely (safetensors only, no remote
code unless asked).

`rayft init-model --arch FAMILY --preset tiny|small|bench --out DIR` lands here. Presets:
  tiny   hidden 128, 2 layers, head_dim 64 (runs on vLLM's CPU attention), for tests
  small  hidden 256, 4 layers, a few million parameters, for examples
  bench  hidden 512, 8 layers, ~30M parameters, 512-token context, for benchmarks
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterable

from trainers.errors import UserError

from trainers.chat_templates import CHATML, ChatTemplate, resolve as resolve_template


PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=1024, max_position_embeddings=512),
    "small": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                  intermediate_size=688, vocab_size=4096, max_position_embeddings=1024),
    "bench": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                  intermediate_size=1376, vocab_size=8192, max_position_embeddings=512),
}


def builtin_corpus(n_lines: int = 4000, seed: int = 0) -> list[str]:
    """Plain text covering digits, arithmetic, chat roles and common English words, so a
    tokenizer trained on it encodes the synthetic tasks and ordinary prompts compactly."""
    rng = random.Random(seed)
    words = ("the a an of to and in is it you that he was for on are as with his they at be this "
             "have from or one had by word but not what all were we when your can said there use "
             "each which she do how their if will up other about out many then them these so some "
             "her would make like him into time has look two more write go see number no way could "
             "people my than first water been call who oil its now find long down day did get come "
             "made may part answer question reverse string sum add plus minus equals result step "
             "think because therefore so first second finally system user assistant model data "
             "good bad correct wrong yes no hello world please thanks sure here review movie great "
             "terrible love hate fine okay letter sequence list sort copy repeat translate").split()
    lines = []
    for i in range(n_lines):
        kind = i % 4
        if kind == 0:
            a, b = rng.randint(0, 999), rng.randint(0, 999)
            lines.append(f"What is {a} + {b}? {a} + {b} = {a + b}. The answer is {a + b}.")
        elif kind == 1:
            s = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
            lines.append(f"Reverse the string {s}: {s[::-1]}")
        else:
            lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 16))).capitalize() + ".")
    return lines


def train_tokenizer(texts: Iterable[str], vocab_size: int, template: ChatTemplate = CHATML):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers, with the chat
    template's special tokens; eos is the template's end of turn, so generation stops there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", *template.special_tokens, "<|pad|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=template.end_of_turn, pad_token="<|pad|>",
                                   bos_token=template.bos or None, unk_token=None, model_max_length=1_000_000)
    fast.chat_template = template.jinja
    return fast


def build_model(preset: str, out_dir: str | Path, corpus_files: list[str] | None = None, seed: int = 0,
                pretrain_steps: int = 0, arch: str = "llama") -> Path:
    """Create a model of family `arch` and its tokenizer in `out_dir`, written by transformers'
    own `save_pretrained`: random weights, or with `pretrain_steps` > 0 briefly trained on
    the corpus so it is a (weak) language model that parameter-efficient methods can adapt,
    as they would a real base model."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from trainers.families import FAMILIES

    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(PRESETS)}")
    if arch not in FAMILIES:
        raise UserError(f"unknown architecture '{arch}'; choose one of {', '.join(FAMILIES)}")
    family = FAMILIES[arch]
    spec = dict(PRESETS[preset])
    texts = builtin_corpus()
    for path in corpus_files or []:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: corpus file not found")
        texts.extend(line for line in p.read_text(encoding="utf-8").splitlines() if line.strip())
    tokenizer = train_tokenizer(texts, spec["vocab_size"], family.template)
    # The trained vocabulary can be smaller than asked for; round the embedding up to 64.
    spec["vocab_size"] = -(-len(tokenizer) // 64) * 64
    config = family.config(spec, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if pretrain_steps > 0:
        pretrain(model, tokenizer, texts, pretrain_steps, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, do_sample=False)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def pretrain(model, tokenizer, texts: list[str], steps: int, seed: int = 0,
             seq_len: int = 128, batch_size: int = 16, lr: float = 2e-3) -> float:
    """Next-token training on `texts` packed into `seq_len` windows; returns the last loss."""
    import torch

    ids = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = windows[torch.randint(len(windows), (batch_size,), generator=gen)]
        for group in optimizer.param_groups:  # linear decay keeps the last steps gentle
            group["lr"] = lr * (1 - step / steps)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return loss.item()


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return (sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


def load_tokenizer(path: str | Path, trust_remote_code: bool = False, chat_template: str | None = None):
    from transformers import AutoTokenizer

    _require_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if chat_template:
        tokenizer.chat_template = resolve_template(chat_template, tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str = "sdpa", **load_kwargs):
    """Load a causal LM from safetensors weights only (a .bin-only directory is refused);
    `load_kwargs` go to `from_pretrained` (e.g. a quantization config and device map)."""
    import torch
    from transformers import AutoModelForCausalLM

    _require_dir(path)
    if not any(Path(path).glob("*.safetensors")):
        raise UserError(f"{path}: no *.safetensors weights (pickle checkpoints are not loaded)")
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), trust_remote_code=trust_remote_code,
        use_safetensors=True, attn_implementation=attn_implementation, **load_kwargs)


def routed_experts(path: str | Path) -> int:
    """The number of routed experts per MoE layer of the model in `path` (or in a run
    directory's final/), read from its config.json; 0 for a dense model or no config."""
    import json

    for config in (Path(path) / "config.json", Path(path) / "final" / "config.json"):
        if config.is_file():
            settings = json.loads(config.read_text())
            text = settings.get("text_config") or settings
            return max(int(text.get(key) or 0) for key in ("num_experts", "num_local_experts", "n_routed_experts"))
    return 0


def resolve_dtype(dtype: str, use_gpu: bool) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if use_gpu else "float32"


def _require_dir(path: str | Path) -> None:
    if not Path(path).is_dir():
        raise UserError(f"{path}: model directory not found (build one with `rayft init-model`)")
