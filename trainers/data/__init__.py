"""The data pipeline: read any supported file, normalise its rows to records, render and
tokenise them with the chat template (labels only where the model should learn), split,
mix, pack, and report on a file (`rayft data check`) or make one (`rayft data synth`).

Modules: readers (files to rows), fields and formats (rows to records), load (one file),
render (records to token ids and labels), packing (sequences and batches), mixing
(split and weighted mix), build (a DataConfig to train/eval sets), check, synth.
"""

from trainers.data.build import Datasets, build_datasets
from trainers.data.check import check_file, format_check
from trainers.data.load import LoadResult, load_records
from trainers.data.packing import collate, pack
from trainers.data.readers import read_rows
from trainers.data.render import encode, encode_prompt, render_marked
from trainers.data.synth import TASKS, exact_match, synth_rows, write_synth

__all__ = ["build_datasets", "Datasets", "load_records", "LoadResult", "read_rows", "encode", "encode_prompt",
           "render_marked", "pack", "collate", "check_file", "format_check", "write_synth", "synth_rows",
           "TASKS", "exact_match"]
