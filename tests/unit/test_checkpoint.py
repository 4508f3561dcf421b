"""final/ and checkpoints on disk: a kept directory is swapped in by rename and survives a
crash at every step; a checkpoint counts as complete only when every rank's part is
there; a classification adapter keeps its labels; the RNG (dropout) streams resume exactly."""

import json
import random

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from trainers import kept_dir
from trainers.checkpoint import (MARKER_PREFIX, STATE_FILE, checkpoint_complete, load_checkpoint, save_checkpoint,
                                 save_final, write_rank_marker)
from trainers.kept_dir import aside_path, recover_dir, replace_dir, staging_path


def test_classification_adapter_keeps_labels(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = AutoModelForSequenceClassification.from_pretrained(
        str(tiny_model_dir), num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"]))
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("from an earlier save")
    final = save_final(tmp_path, model, tiny_tokenizer)
    assert (final / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # no final.tmp / final.old left
    assert not (final / "stale.txt").exists()
    assert json.loads((final / "config.json").read_text())["id2label"] == {"0": "neg", "1": "pos"}


# --- a kept directory, crashed at each step of replace_dir -------------------------------

def _tree(path):
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def _write(content):
    def write(directory):
        directory.mkdir()
        (directory / "weights").write_text(content)
    return write


@pytest.fixture
def kept(tmp_path):
    target = tmp_path / "final"
    replace_dir(target, _write("old"))
    assert _tree(target) == {"weights": "old"}
    return target


def test_replace_dir_swaps_in_the_new_and_leaves_nothing_beside(kept):
    replace_dir(kept, _write("new"))
    assert _tree(kept) == {"weights": "new"}
    assert sorted(p.name for p in kept.parent.iterdir()) == ["final"]


def test_a_failing_write_leaves_the_old_directory(kept):
    def broken(directory):
        _write("half")(directory)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(kept, broken)
    assert _tree(kept) == {"weights": "old"} and not staging_path(kept).exists()


def test_crash_while_writing_keeps_the_old_and_the_next_save_discards_the_partial(kept):
    _write("partial")(staging_path(kept))  # step 1 cut short
    recover_dir(kept)  # a reader: X is whole, nothing to do, and X.tmp may be a live writer's
    assert _tree(kept) == {"weights": "old"} and staging_path(kept).exists()
    replace_dir(kept, _write("new"))
    assert _tree(kept) == {"weights": "new"} and not staging_path(kept).exists()


def test_crash_between_the_renames_restores_the_old(kept):
    _write("new")(staging_path(kept))
    kept_dir.set_aside(kept)  # step 2 done, step 3 never ran: no final/ at all
    assert not kept.exists() and aside_path(kept).exists()
    recover_dir(kept)  # what the next save or a reader (inspect_model) does first
    assert _tree(kept) == {"weights": "old"} and not aside_path(kept).exists()


def test_crash_after_the_new_is_in_place_drops_the_old(kept):
    _write("new")(staging_path(kept))
    kept_dir.set_aside(kept)
    kept_dir.move_in(kept)  # step 4 never ran
    assert aside_path(kept).exists()
    recover_dir(kept)
    assert _tree(kept) == {"weights": "new"} and not aside_path(kept).exists()


def test_a_reader_restores_final_of_a_run(tiny_model_dir, tmp_path):
    import shutil

    from cluster.evaluate.target import inspect_model

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_model_dir, aside_path(run / "final"))  # a save died between its renames
    assert inspect_model(run).path == run / "final" and (run / "final" / "config.json").is_file()


# --- checkpoint completeness -------------------------------------------------------------

class FileStrategy:
    """The strategy's half of a checkpoint, as DDP/ZeRO write it: rank 0 the trained
    tensors, every rank its own shard file."""

    def __init__(self, payload=b"x" * 100):
        self.payload, self.loaded = payload, None

    def save_state(self, directory, rank):
        if rank == 0:
            (directory / "trainable.safetensors").write_bytes(self.payload)
        (directory / "zero").mkdir(exist_ok=True)
        (directory / "zero" / f"shard_rank{rank}.pt").write_bytes(self.payload * (rank + 1))

    def load_state(self, directory, rank):
        self.loaded = (directory / "zero" / f"shard_rank{rank}.pt").read_bytes()


def _merged_checkpoint(tmp_path, world_size, ranks):
    """What Ray's storage holds once the listed ranks' directories were copied into one."""
    import shutil

    merged = tmp_path / "step_00000010"
    for rank in ranks:
        own = tmp_path / f"rank{rank}"
        save_checkpoint(own, FileStrategy(), step=10, rank=rank)
        if rank == 0:  # save_checkpoint reads the world size from torch.distributed, not set up here
            state = json.loads((own / STATE_FILE).read_text())
            (own / STATE_FILE).write_text(json.dumps(state | {"world_size": world_size}))
            write_rank_marker(own, 0)
        shutil.copytree(own, merged, dirs_exist_ok=True)
    return merged


def test_a_checkpoint_is_complete_only_with_every_rank(tmp_path):
    assert checkpoint_complete(_merged_checkpoint(tmp_path / "a", 2, [0, 1])) is None
    only_rank0 = _merged_checkpoint(tmp_path / "b", 2, [0])
    assert "rank 1 of 2" in checkpoint_complete(only_rank0)
    with pytest.raises(RuntimeError, match="incomplete.*rank 1 of 2"):
        load_checkpoint(only_rank0, FileStrategy(), rank=0)
    only_rank1 = _merged_checkpoint(tmp_path / "c", 2, [1])
    assert STATE_FILE in checkpoint_complete(only_rank1)


def test_a_marker_copied_before_its_files_does_not_count(tmp_path):
    merged = _merged_checkpoint(tmp_path, 2, [0, 1])
    shard = merged / "zero" / "shard_rank1.pt"
    shard.write_bytes(shard.read_bytes()[:50])  # the copy of rank 1's shard is still under way
    assert "zero/shard_rank1.pt of rank 1" in checkpoint_complete(merged)
    shard.unlink()
    assert "zero/shard_rank1.pt of rank 1" in checkpoint_complete(merged)


def test_each_rank_marks_only_its_own_files(tmp_path):
    save_checkpoint(tmp_path / "r1", FileStrategy(), step=3, rank=1)
    listed = json.loads((tmp_path / "r1" / f"{MARKER_PREFIX}1").read_text())["files"]
    assert listed == {"rng_rank1.pt": (tmp_path / "r1" / "rng_rank1.pt").stat().st_size,
                      "zero/shard_rank1.pt": 200}
    save_checkpoint(tmp_path / "r0", FileStrategy(), step=3, rank=0)
    state = json.loads((tmp_path / "r0" / STATE_FILE).read_text())
    assert state["step"] == 3 and state["world_size"] == 1  # a single process: world size 1
    assert checkpoint_complete(tmp_path / "r0") is None


# --- RNG: dropout after a resume ---------------------------------------------------------

def test_a_restored_rng_gives_the_same_dropout_masks(tiny_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attention_dropout=0.3).train()
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(7)
    random.seed(7)
    with torch.no_grad():
        model(input_ids=ids)  # some training before the checkpoint
    save_checkpoint(tmp_path, FileStrategy(), step=1, rank=0)
    with torch.no_grad():
        after_save = [model(input_ids=ids).logits for _ in range(2)]
    expected_python = [random.random() for _ in range(3)]
    assert not torch.allclose(after_save[0], after_save[1])  # dropout is on: masks differ per forward

    torch.manual_seed(123)  # a restarted worker starts from its seed, not from the checkpoint
    random.seed(123)
    load_checkpoint(tmp_path, FileStrategy(), rank=0)
    with torch.no_grad():
        resumed = [model(input_ids=ids).logits for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(resumed, after_save))
    assert [random.random() for _ in range(3)] == expected_python
