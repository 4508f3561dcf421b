"""Sequence classification (`method: classification`): a classification head on the
causal LM's last token, trained with cross-entropy on text/label data. The label set
comes from the training data (sorted); eval reports loss, accuracy and macro-F1, and
`final/` loads with `AutoModelForSequenceClassification` (labels in `config.id2label`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainers.data.records import Example, Labelled
from trainers.errors import DataError, UserError
from trainers.method import Method
from trainers.metrics import macro_f1
from trainers.models import resolve_dtype


def label_set(records: list[Labelled]) -> list[str]:
    labels = sorted({r.label for r in records})
    if len(labels) < 2:
        raise UserError(f"classification needs at least 2 distinct labels in the training data, found {labels}")
    return labels


def encode_labelled(records: list[Labelled], tokenizer, labels: list[str], max_length: int,
                    truncation_side: str) -> list[Example]:
    index = {label: i for i, label in enumerate(labels)}
    out = []
    for rec in records:
        if rec.label not in index:
            path, _, line = rec.origin.rpartition(":")
            raise DataError(path or rec.origin, int(line) if line.isdigit() else None,
                            f"label {rec.label!r} is not in the training label set {labels}", field="label")
        ids = tokenizer(rec.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        truncated = len(ids) > max_length
        ids = ids[-max_length:] if truncation_side == "left" else ids[:max_length]
        out.append(Example(input_ids=ids, labels=[index[rec.label]], truncated=truncated))
    return out


def load_sequence_classifier(job, tokenizer, use_gpu: bool, id2label: dict[int, str]) -> torch.nn.Module:
    """The causal LM at `job.model.path` with a fresh `len(id2label)`-way head on its last
    token (one output: a scalar reward model), PEFT and freezing applied."""
    from transformers import AutoModelForSequenceClassification

    from trainers.setup import apply_peft_and_freezing

    cfg = job.model
    model = AutoModelForSequenceClassification.from_pretrained(
        cfg.path, num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
        dtype=getattr(torch, resolve_dtype(cfg.dtype, use_gpu)), use_safetensors=True,
        trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    return apply_peft_and_freezing(model, job, task_type="SEQ_CLS")


class ClassificationMethod(Method):
    name = "classification"
    metric, higher_is_better = "eval_accuracy", True

    def __init__(self, job, tokenizer, use_gpu: bool, labels: list[str]):
        super().__init__(job, tokenizer, use_gpu)
        self.labels = labels

    def build_model(self) -> torch.nn.Module:
        return load_sequence_classifier(self.job, self.tokenizer, self.use_gpu, dict(enumerate(self.labels)))

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in examples)
        input_ids = torch.full((len(examples), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            input_ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[row, :len(e.input_ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask,
                "labels": torch.tensor([e.labels[0] for e in examples])}

    @staticmethod
    def count_items(batch: dict) -> int:
        return int(batch["labels"].numel())

    def _logits(self, model, batch):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()

    def loss(self, model, batch):
        logits = self._logits(model, batch)
        return F.cross_entropy(logits, batch["labels"], reduction="sum"), batch["labels"].new_tensor(len(logits))

    def eval_sums(self, model, batch):
        logits = self._logits(model, batch)
        labels, predicted = batch["labels"], logits.argmax(-1)
        sums = {"loss": float(F.cross_entropy(logits, labels, reduction="sum")), "items": float(len(labels)),
                "correct": float((predicted == labels).sum())}
        for k in range(len(self.labels)):
            sums[f"tp{k}"] = float(((predicted == k) & (labels == k)).sum())
            sums[f"fp{k}"] = float(((predicted == k) & (labels != k)).sum())
            sums[f"fn{k}"] = float(((predicted != k) & (labels == k)).sum())
        return sums

    def finish_eval(self, sums):
        n, k = max(sums["items"], 1.0), range(len(self.labels))
        return {"eval_loss": sums["loss"] / n, "eval_accuracy": sums["correct"] / n,
                "eval_f1": macro_f1([sums[f"tp{i}"] for i in k], [sums[f"fp{i}"] for i in k],
                                    [sums[f"fn{i}"] for i in k])}


def prepare_classification(datasets, tokenizer, data_cfg):
    """Records -> encoded Examples, in place; returns the label set."""
    labels = label_set(datasets.train)
    encode = lambda recs: encode_labelled(recs, tokenizer, labels, data_cfg.max_length, data_cfg.truncation_side)
    datasets.train, datasets.eval = encode(datasets.train), encode(datasets.eval)
    datasets.stats["labels"] = labels
    return labels
