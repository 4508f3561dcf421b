"""`rayft export CHECKPOINT --out DIR [--merge-lora] [--force]`: write a standalone
transformers model directory from a run or a model directory.

- an adapter with `--merge-lora` (LoRA, DoRA, IA3): base + adapter merged by peft's
  `merge_and_unload`, saved as a plain model (safetensors) with the tokenizer; it loads
  with `AutoModelForCausalLM` (or `...ForSequenceClassification`) and no peft. Prefix and
  prompt tuning add virtual tokens rather than weight deltas, so they cannot merge.
- an adapter without `--merge-lora`: the adapter directory copied as it is.
- a full model: loaded and saved again (safetensors, in the dtype it was saved in).

The result is written to `DIR.tmp` and swapped in by rename (`trainers.kept_dir`), so DIR is
never half-written and an old DIR goes only once the new one is in place; a non-empty DIR
is only replaced with `--force`, and never when it is, holds or lies inside what the export
reads (the model, the run directory named, an adapter's base model).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from cluster.evaluate.target import CLASSIFIER, ModelDir, class_labels, inspect_model, load_model, saved_dtype
from trainers.errors import UserError
from trainers.kept_dir import aside_path, recover_dir, replace_dir, staging_path


def export(checkpoint: str | Path, out: str | Path, merge_lora: bool = False, force: bool = False) -> str:
    """Export `checkpoint` to `out`; returns one line saying what was written."""
    md = inspect_model(checkpoint)
    out = Path(out)
    _check_destination(md, Path(checkpoint), out, force)
    if merge_lora and md.peft_type is not None and not md.mergeable:
        raise UserError(f"{md.path}: a {md.peft_type.lower()} adapter adds virtual tokens instead of weight "
                        "changes and cannot be merged; export it without --merge-lora (the adapter is copied)")
    if md.peft_type is not None and not merge_lora:
        what = f"copied the {md.peft_type.lower()} adapter (base {md.base})"
        replace_dir(out, lambda directory: shutil.copytree(md.path, directory))
    else:
        what = (f"merged the {md.peft_type.lower()} adapter into {md.base}" if md.peft_type
                else "saved the full model again" + (" (no adapter to merge)" if merge_lora else ""))
        replace_dir(out, lambda directory: _save_standalone(md, directory))
    return f"{what}: {out}"


def _check_destination(md: ModelDir, given: Path, out: Path, force: bool) -> None:
    """Nothing the export reads may be replaced by it: OUT (and the OUT.tmp / OUT.old it
    writes beside) must not be, hold, or lie inside the model directory, the directory
    named on the command line (a run), or an adapter's base model."""
    sources = {"the model being exported": md.path, "the directory given to export": given}
    if md.base is not None:
        sources["the adapter's base model"] = md.base
    for written in (out, staging_path(out), aside_path(out)):
        target = written.resolve()
        for what, source in sources.items():
            source = source.resolve()
            if target == source or target in source.parents or source in target.parents:
                relation = "is" if target == source else "holds" if target in source.parents else "lies inside"
                subject = "" if written == out else f"{written.name}, written beside it, "
                raise UserError(f"--out {out}: {subject}{relation} {what} ({source}); choose an --out outside it")
    recover_dir(out)  # an export cut short between its renames leaves OUT.old: that is OUT
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out}: exists and is not empty (use --force to replace it)")


def _save_standalone(md: ModelDir, directory: Path) -> None:
    """The model with any adapter merged, saved in the dtype its weights came in."""
    import torch

    # Merge in float32 (a bf16 base + delta rounds twice), then store as the base was stored.
    dtype = saved_dtype(md.base or md.path)
    model, tokenizer = load_model(md, "float32", "cpu")
    if md.peft_type is not None:
        model = model.merge_and_unload()
    if md.task == CLASSIFIER:
        # The labels live with the adapter (or its config), not in the causal base it was trained on.
        labels = class_labels(md)
        model.config.id2label, model.config.label2id = labels, {v: k for k, v in labels.items()}
    model.to(getattr(torch, dtype)).save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
