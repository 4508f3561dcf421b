"""The eval passes: each runs the model over batches (with a progress bar on stderr) and
returns its metrics and a result per evaluated row.

- `loss_pass`: rows encoded exactly as for training (`encode`, `collate`), loss summed
  with `token_nll_sum` over the trained tokens (assistant turns, or every token of raw
  text), so eval loss and training eval loss mean the same thing.
- `exact_match_pass`: greedy generation from the chat-template prompt, stopped at eos or
  `max_new_tokens`, compared with `exact_match`.
- `classification_pass`: rows encoded as the classification trainer does
  (`encode_labelled`), argmax of the classifier's logits against the gold labels.

Rows are batched in length order (less padding); results come back in row order.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from tqdm import tqdm

from cluster.evaluate.metrics import accuracy, f1_per_label, macro_f1, mean_loss, perplexity
from trainers.data import collate, encode, encode_prompt, exact_match
from trainers.data.records import IGNORE_INDEX, Labelled, Prompt
from trainers.losses import token_nll_sum


def batches(lengths: dict[int, int], batch_size: int, desc: str) -> Iterator[list[int]]:
    """Row indices (keys of `lengths`) in batches of similar length, under a tqdm bar."""
    order = sorted(lengths, key=lengths.__getitem__)
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", dynamic_ncols=True):
        yield order[start: start + batch_size]


@torch.inference_mode()
def loss_pass(model, tokenizer, records: list, max_length: int, side: str, batch_size: int,
              device) -> tuple[dict, list]:
    examples = [encode(r, tokenizer, max_length, side) for r in records]
    # A row whose trained tokens were all cut away by truncation has no loss to take.
    scored = {i: len(e.input_ids) for i, e in enumerate(examples) if any(t != IGNORE_INDEX for t in e.labels)}
    results: list = [None] * len(records)
    nll_total, token_total = 0.0, 0
    for idx in batches(scored, batch_size, "loss"):
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        input_ids = batch["input_ids"].to(device)
        logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False).logits
        # Prompt tuning prepends virtual tokens to the logits; the last T are the inputs'.
        logits, labels = logits[:, -input_ids.shape[1]:], batch["labels"].to(device)
        for row, i in enumerate(idx):
            nll, n = token_nll_sum(logits[row: row + 1], labels[row: row + 1])
            nll_total, token_total = nll_total + nll.item(), token_total + int(n)
            results[i] = {"loss": nll.item() / int(n), "tokens": int(n)}
    loss = mean_loss(nll_total, token_total)
    metrics = {"loss": loss, "perplexity": perplexity(loss), "tokens": token_total, "loss_samples": len(scored),
               "truncated": sum(e.truncated for e in examples)}
    return metrics, results


@torch.inference_mode()
def exact_match_pass(model, tokenizer, prompts: dict[int, Prompt], max_length: int, max_new_tokens: int,
                     batch_size: int, device) -> tuple[dict, dict]:
    # Over-long prompts keep their end: the question sits just before the generation prompt.
    ids = {i: encode_prompt(p.prompt_messages, tokenizer)[-max_length:] for i, p in prompts.items()}
    results = {}
    for idx in batches({i: len(v) for i, v in ids.items()}, batch_size, "generate"):
        texts = generate(model, tokenizer, [ids[i] for i in idx], max_new_tokens, device)
        for i, text in zip(idx, texts):
            p = prompts[i]
            results[i] = {"prompt": p.prompt_messages, "reference": p.reference, "generation": text,
                          "correct": exact_match(text, p.reference)}
    correct = sum(r["correct"] for r in results.values())
    metrics = {"exact_match": correct / len(results) if results else float("nan"),
               "exact_match_correct": correct, "exact_match_samples": len(results)}
    return metrics, results


def generate(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, device) -> list[str]:
    """Greedy continuations of a batch of token-id prompts (left-padded, so every row's
    new tokens start at the same column), decoded up to the first eos."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attention[row, width - len(p):] = 1
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), generation_config=config)
    texts = []
    for row in out[:, width:].tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


@torch.inference_mode()
def classification_pass(model, tokenizer, records: list[Labelled], gold: list[int], id2label: dict[int, str],
                        max_length: int, side: str, batch_size: int, device) -> tuple[dict, list]:
    # Encoded by the classification trainer's own function: the head reads the last token,
    # so eval must end each row exactly as training did.
    from trainers.classify import encode_labelled

    names = [id2label[i] for i in sorted(id2label)]
    named = [Labelled(r.text, id2label[g], r.origin) for r, g in zip(records, gold)]
    examples = encode_labelled(named, tokenizer, names, max_length, side)
    predicted: list = [None] * len(records)
    for idx in batches({i: len(e.input_ids) for i, e in enumerate(examples)}, batch_size, "classify"):
        batch = collate([examples[i] for i in idx], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits
        for i, position in zip(idx, logits.argmax(-1).tolist()):
            predicted[i] = names[position]
    gold_names = [r.label for r in named]
    metrics = {"accuracy": accuracy(gold_names, predicted), "macro_f1": macro_f1(gold_names, predicted),
               "f1_per_label": f1_per_label(gold_names, predicted)}
    results = [{"text": r.text, "label": g, "predicted": p, "correct": g == p}
               for r, g, p in zip(records, gold_names, predicted)]
    return metrics, results
