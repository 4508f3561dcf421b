"""A training worker's failure reaches the user of `rayft train` as the exception the
worker raised, its type and complete message (not Ray's cut-off WorkerGroupError
snippet), with every failed worker's full traceback in the run directory."""

import json
import re
import shutil

from cluster.cli import main


def test_a_worker_error_reaches_the_cli_whole(ray_cluster, tiny_model_dir, addition_data, tmp_path, capsys):
    # The driver only reads the tokenizer; each worker fails building the model, in
    # transformers, on an activation name longer than the 1000 characters Ray shows.
    activation = "rayft_missing_activation_" + "".join(f"{i:04d}" for i in range(300))
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps(config | {"hidden_act": activation}))

    code = main(["train", f"model.path={model_dir}", f"data.train=[{addition_data}]", f"output_dir={tmp_path}",
                 "name=fails", "cluster.num_workers=2", "cluster.max_failures=0", "train.max_steps=2"])
    err = capsys.readouterr().err
    assert code == 1, err
    traceback_file = tmp_path / "fails" / "error.txt"
    # rayft's own lines (after the progress bar's; Ray's log lines interleave when shown).
    ours = [line[line.index("rayft: "):] for line in err.splitlines() if "rayft: " in line]
    assert len(ours) == 2, err
    assert re.fullmatch(rf"rayft: error: worker \d raised KeyError: '{activation}'", ours[0]), ours[0]
    assert ours[1] == f"rayft: the full traceback of every failed worker: {traceback_file}"
    text = traceback_file.read_text()
    failed = text.count("=== worker ")
    assert failed >= 1 and text.count("=== worker ") == text.count(": KeyError\n") == failed, text
    assert text.count("Traceback (most recent call last)") == failed
    assert "activations.py" in text and activation in text  # the frames down to where it raised
