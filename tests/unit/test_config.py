"""Config loading: YAML + overrides, type checks and errors that name the key."""

import pytest

from cluster.config import JobConfig, dump_yaml, field_help, load_config
from trainers.errors import ConfigError, UserError

BASE = ["model.path=/m", "data.train=d.jsonl"]


def test_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "job.yaml"
    cfg_file.write_text("model: {path: /m}\ndata:\n  train: [a.jsonl, {path: b.jsonl, weight: 2}]\n"
                        "train: {lr: 2e-4}\n")
    cfg = load_config(cfg_file, ["train.batch_size=4", "peft.method=lora", "peft.target_modules=[q_proj, v_proj]"])
    assert cfg.name == "job"  # from the file's stem
    assert cfg.train.lr == pytest.approx(2e-4)  # YAML 1.1 reads 2e-4 as a string; we accept it
    assert cfg.train.batch_size == 4
    assert [s.path for s in cfg.data.train] == ["a.jsonl", "b.jsonl"]
    assert cfg.data.train[1].weight == 2.0
    assert cfg.peft.target_modules == ["q_proj", "v_proj"]
    assert cfg.run_dir.name == "job"


@pytest.mark.parametrize("override, key, expected", [
    ("train.lrr=1", "train.lrr", "unknown key"),
    ("bogus=1", "bogus", "unknown key"),
    ("train.lr=fast", "train.lr", "expected a number"),
    ("train.batch_size=2.5", "train.batch_size", "expected an integer"),
    ("peft.method=qlora9", "peft.method", "must be one of"),
    ("data.packing=maybe", "data.packing", "expected true or false"),
    ("cluster.num_workers=0", "cluster.num_workers", "must be >= 1"),
    ("data.eval_fraction=1.5", "data.eval_fraction", "must be in [0, 1)"),
    ("data.train=[{path: a, weight: 0}]", "data.train[0].weight", "must be > 0"),
    ("train=3", "train", "expected a mapping"),
    ("rollout.timeout_s=0", "rollout.timeout_s", "must be > 0"),
    ("rollout.max_staleness=-1", "rollout.max_staleness", "must be >= 0"),
    ("rollout.num_engines=0", "rollout.num_engines", "must be >= 1"),
    ("algo.correction_cap=0.5", "algo.correction_cap", "must be >= 1"),
    ("algo.rollout_correction=is", "algo.rollout_correction", "must be one of"),
])
def test_errors_name_the_key(override, key, expected):
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + [override], default_name="x")
    assert err.value.key == key
    assert f"'{key}'" in str(err.value) and expected in str(err.value)


def test_required_keys():
    with pytest.raises(ConfigError, match="model.path"):
        load_config(None, ["data.train=d.jsonl"], default_name="x")
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["model.path=/m"], default_name="x")


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(UserError, match="key.sub=value"):
        load_config(None, ["novalue"], default_name="x")


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, BASE + ["train.lr=0.5", "data.packing=true"], default_name="x")
    dump_yaml(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_every_key_has_help():
    rows = field_help(JobConfig)
    assert {"train.lr", "data.max_length", "peft.r", "cluster.num_workers"} <= {k for k, _, _ in rows}
    assert all(help_text for _, help_text, _ in rows)


@pytest.mark.parametrize("overrides, key", [
    (["peft.method=prefix", "data.packing=true"], "data.packing"),
    (["freeze.mode=gradual", "freeze.unfreeze_every=2", "cluster.strategy=zero2"], "freeze.mode"),
    (["cluster.strategy=ddp", "cluster.offload_optimizer=true"], "cluster.offload_optimizer"),
    (["cluster.strategy=zero2", "cluster.offload_params=true"], "cluster.offload_params"),
    (["train.early_stopping_patience=2"], "train.eval_every"),
    (["data.replay_ratio=0.2"], "data.replay_ratio"),
    (["method=dpo", "data.streaming=true"], "data.streaming"),
    (["method=grpo", "data.streaming=true", "rewards.rewards=[{fn: exact_match}]"], "data.streaming"),
])
def test_invalid_combinations_name_a_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, BASE + overrides, default_name="x")
    assert err.value.key == key


@pytest.mark.parametrize("overrides, key", [
    (["method=grpo", "rewards.rewards=[{fn: exact_match}]", "algo.estimator=rloo", "algo.samples_per_prompt=1"],
     "algo.samples_per_prompt"),
    (["method=grpo"], "rewards.rewards"),
    (["method=grpo", "rewards.rewards=[{fn: exact_match}]", "peft.method=dora"], "peft.method"),
    (["method=distill"], "distill.teacher"),
    (["method=ppo", "rewards.rewards=[{fn: exact_match}]", "model.reference=adapter_disabled"], "model.reference"),
    (["method=ppo", "rewards.rewards=[{fn: exact_match}]", "algo.reference=frozen_copy"], "algo.reference"),
    (["method=grpo", "rewards.rewards=[{fn: exact_match}]", "algo.temperature=0"], "algo.temperature"),
    (["method=grpo", "rewards.rewards=[{fn: exact_match}]", "rollout.lora_sync=adapter"], "rollout.lora_sync"),
])
def test_rl_settings_that_cannot_work_name_their_key(overrides, key):
    with pytest.raises(Exception, match=f"'{key}'"):
        load_config(None, ["model.path=m", "data.train=d.jsonl", *overrides], "t")


def test_an_moe_model_is_refused_the_transformers_engine_for_weight_syncs(tmp_path):
    (tmp_path / "moe").mkdir()
    (tmp_path / "moe" / "config.json").write_text('{"model_type": "qwen3_moe", "num_experts": 4}')
    rl = [f"model.path={tmp_path / 'moe'}", "data.train=d.jsonl", "method=grpo", "rewards.rewards=[{fn: exact_match}]"]
    with pytest.raises(ConfigError, match="'rollout.engine'.*MoE"):
        load_config(None, [*rl, "rollout.engine=hf"], "t")
    assert load_config(None, [*rl, "rollout.engine=vllm"], "t").rollout.engine == "vllm"


def test_a_lora_policy_syncs_its_adapter_to_engines_with_lora_slots_of_its_rank():
    rl = ["model.path=m", "data.train=d.jsonl", "method=grpo", "rewards.rewards=[{fn: exact_match}]"]
    lora = load_config(None, [*rl, "peft.method=lora", "peft.r=24"], "t")
    assert lora.adapter_sync
    settings = lora.engine_settings()
    assert settings.enable_lora and settings.max_lora_rank == 32  # the next rank vLLM accepts
    merged = load_config(None, [*rl, "peft.method=lora", "rollout.lora_sync=merged"], "t")
    assert not merged.adapter_sync and merged.engine_settings() == merged.rollout
    assert not load_config(None, rl, "t").adapter_sync


def test_rl_sections_are_ignored_by_supervised_methods():
    config = load_config(None, ["model.path=m", "data.train=d.jsonl"], "t")
    assert not config.uses_rollouts and config.rewards.rewards == []
    assert load_config(None, ["model.path=m", "data.train=d.jsonl", "method=distill", "distill.teacher=t",
                              "distill.mode=on_policy"], "t").uses_rollouts


def test_a_run_directory_stands_for_its_final_model(tmp_path):
    from cluster.config import with_absolute_paths

    run = tmp_path / "runs" / "sft"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    plain = tmp_path / "model"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    config = load_config(None, [f"model.path={run}", "data.train=d.jsonl", "method=distill",
                                f"distill.teacher={plain}"], "t")
    resolved = with_absolute_paths(config)
    assert resolved.model.path == str(run / "final")
    assert resolved.distill.teacher == str(plain)


def test_the_config_core_and_the_tune_section_import_no_section():
    """No import cycle: the core imports no section, and the tune section only the core."""
    import subprocess
    import sys

    code = ("import sys, cluster.tune_config, cluster.config_core; "
            "print(sorted(m for m in sys.modules if m in ('cluster.config', 'trainers.config', "
            "'rollout.rewards', 'trainers.rl.config')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("old", ["dpo.reference", "algo.reference"])
def test_the_old_reference_keys_say_where_the_setting_moved(old):
    with pytest.raises(ConfigError, match=f"'{old}': has moved to model.reference"):
        load_config(None, BASE + [f"{old}=adapter_disabled"], default_name="x")


def test_every_config_key_is_read_somewhere():
    """A key that only its declaration and validation mention is a dead setting: it is
    accepted and documented but changes nothing."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    declaring = {"trainers/config.py", "trainers/rl/config.py", "rollout/config.py", "rollout/rewards.py",
                 "cluster/config.py", "cluster/tune_config.py", "cluster/config_core.py"}
    code = "\n".join(p.read_text() for folder in ("cluster", "trainers", "rollout", "services")
                     for p in (root / folder).rglob("*.py") if str(p.relative_to(root)) not in declaring)
    handled_elsewhere = {"rollout.verify_sync"}  # wired together with the rollout pool
    dead = [key for key, _, _ in field_help(JobConfig)
            if key not in handled_elsewhere and not re.search(rf"\.{key.rsplit('.', 1)[-1]}\b", code)]
    assert dead == []


# --- resuming a run directory: only with the config it was started with ------------------

def _run_with_checkpoint(tmp_path, *overrides):
    """A run directory as a finished run leaves it: config.yaml and a complete checkpoint."""
    from trainers.checkpoint import STATE_FILE, write_rank_marker

    cfg = load_config(None, BASE + [f"output_dir={tmp_path}", *overrides], default_name="run")
    cfg.run_dir.mkdir(parents=True)
    dump_yaml(cfg, cfg.run_dir / "config.yaml")
    step = cfg.run_dir / "checkpoints" / "step_00000010"
    step.mkdir(parents=True)
    (step / STATE_FILE).write_text('{"step": 10, "world_size": 1}')
    write_rank_marker(step, 0)
    return cfg


def test_resume_with_the_same_or_harmlessly_changed_config_goes_ahead(tmp_path):
    from cluster.resume import check_resume

    cfg = _run_with_checkpoint(tmp_path, "train.max_steps=10")
    said = []
    same = load_config(None, BASE + [f"output_dir={tmp_path}", "train.max_steps=10", "train.log_every=5",
                                     "train.save_every=2", "cluster.max_failures=5", "cluster.address=auto"],
                       default_name="run")
    check_resume(same, cfg.run_dir, said.append)
    assert said == [f"resuming from step_00000010 in {cfg.run_dir}"]


def test_resume_with_a_changed_plan_is_refused_naming_every_key(tmp_path):
    from cluster.resume import check_resume

    cfg = _run_with_checkpoint(tmp_path, "train.max_steps=10")
    before = (cfg.run_dir / "config.yaml").read_text()
    changed = load_config(None, BASE + [f"output_dir={tmp_path}", "train.max_steps=20", "train.lr=1e-3",
                                        "peft.method=lora", "cluster.num_workers=4", "data.max_length=64"],
                          default_name="run")
    with pytest.raises(UserError) as err:
        check_resume(changed, cfg.run_dir, lambda *_: None)
    message = str(err.value)
    for key, old, new in [("train.max_steps", 10, 20), ("train.lr", 0.0002, 0.001), ("peft.method", "'none'", "'lora'"),
                          ("cluster.num_workers", 2, 4), ("data.max_length", cfg.data.max_length, 64)]:
        assert f"{key}: {old} -> {new}" in message, key
    assert "train.resume_changed=true" in message and "\n" not in message
    assert (cfg.run_dir / "config.yaml").read_text() == before

    said = []
    changed.train.resume_changed = True
    check_resume(changed, cfg.run_dir, said.append)
    assert "train.max_steps" in said[0] and said[1].startswith("resuming from step_00000010")


def test_resume_of_a_run_saved_before_a_setting_existed_reads_it_as_its_default(tmp_path):
    import yaml

    from cluster.resume import check_resume

    cfg = _run_with_checkpoint(tmp_path, "train.max_steps=10")
    saved = cfg.run_dir / "config.yaml"
    data = yaml.safe_load(saved.read_text())
    del data["train"]["lr"]  # as if written before train.lr existed
    saved.write_text(yaml.safe_dump(data))
    said = []
    check_resume(load_config(None, BASE + [f"output_dir={tmp_path}", "train.max_steps=10"], default_name="run"),
                 cfg.run_dir, said.append)
    assert said == [f"resuming from step_00000010 in {cfg.run_dir}"]
    with pytest.raises(UserError, match=r"train.lr: 0.0002 -> 0.001"):  # a real change is still named
        check_resume(load_config(None, BASE + [f"output_dir={tmp_path}", "train.max_steps=10", "train.lr=1e-3"],
                                 default_name="run"), cfg.run_dir, lambda *_: None)


def test_resume_ignores_incomplete_checkpoints_and_never_refuses(tmp_path):
    from cluster.resume import check_resume, latest_complete_checkpoint

    cfg = _run_with_checkpoint(tmp_path)
    newer = cfg.run_dir / "checkpoints" / "step_00000020"
    newer.mkdir()
    (newer / "trainer_state.json").write_text('{"step": 20, "world_size": 2}')  # rank 1 never finished
    assert latest_complete_checkpoint(cfg.run_dir).name == "step_00000010"
    never = load_config(None, BASE + [f"output_dir={tmp_path}", "train.resume=never"], default_name="run")
    with pytest.raises(UserError, match="already has checkpoints"):
        check_resume(never, cfg.run_dir, lambda *_: None)
    fresh = load_config(None, BASE + [f"output_dir={tmp_path}", "name=other", "train.max_steps=99"])
    check_resume(fresh, fresh.run_dir, lambda *_: pytest.fail("nothing to resume"))
