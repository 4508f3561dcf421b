"""The data pipeline: read any supported file, normalise its rows to records, render and
tokenise them with the chat template (labels only where the model should learn), split,
mix, pack, and report on a file (`rayft data check`) or make one (`rayft data synth`).

Modules: readers (files to rows), fields and formats (rows to records), load (one file),
render (records to token ids and labels), packing (sequences and batches), mixing
(split and weighted mix), build (a DataConfig to train/eval sets), check, synth.
"""

import importlib

# Name -> the module defining it, imported at first use: reading rows needs no torch.
_EXPORTS = {"build_datasets": "build", "Datasets": "build", "check_file": "check", "format_check": "check",
            "LoadResult": "load", "load_records": "load", "collate": "packing", "pack": "packing",
            "read_rows": "readers", "encode": "render", "encode_prompt": "render", "render_marked": "render",
            "TASKS": "synth", "exact_match": "synth", "synth_rows": "synth", "write_synth": "synth"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'trainers.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"trainers.data.{_EXPORTS[name]}"), name)
