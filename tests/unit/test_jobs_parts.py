"""The parts of `rayft submit` / `rayft jobs` that contact no cluster: address and token
resolution, the entrypoint, the runtime env, path checks, and `submit --dry-run`."""

import json
import os
from pathlib import Path

import pytest
import yaml

from cluster import jobs_parts as parts
from cluster.cli import main
from cluster.config import JobConfig, from_dict, load_config
from trainers.errors import ConfigError, UserError


def _workspace(tmp_path: Path) -> Path:
    (tmp_path / "models/tiny").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/train.jsonl").write_text("{}\n")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({
        "name": "my run", "model": {"path": "models/tiny"}, "data": {"train": ["data/train.jsonl"]},
        "cluster": {"address": "ray://head:10001", "num_workers": 1}}))
    return tmp_path


def test_address_precedence_flag_config_env_auto():
    env = {"RAY_ADDRESS": "10.0.0.1:6379", "RAY_API_SERVER_ADDRESS": "http://api:8265"}
    assert parts.resolve_address("http://a:8265", "auto", env) == ("http://a:8265", "--address")
    assert parts.resolve_address(None, "ray://h:10001", env) == ("ray://h:10001", "cluster.address")
    assert parts.resolve_address(None, None, env) == ("http://api:8265", "RAY_API_SERVER_ADDRESS")
    assert parts.resolve_address(None, None, {"RAY_ADDRESS": "auto"}) == ("auto", "RAY_ADDRESS")
    assert parts.resolve_address(None, None, {}) == ("auto", "default")


@pytest.mark.parametrize("address,kind", [
    ("http://h:8265", "http"), ("https://h", "http"), ("ray://h:10001", "ray-client"), ("auto", "cluster"),
    ("10.0.0.1:6379", "cluster"), ("anyscale://c", "module")])
def test_address_kind(address, kind):
    assert parts.address_kind(address) == kind


def test_token_order_follows_ray(tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray/auth_token").write_text("from-home\n")
    (tmp_path / "tok").write_text(" from-path ")
    assert parts.resolve_token("flag", {"RAY_AUTH_TOKEN": "env"}, home) == ("flag", "--auth-token")
    env = {"RAY_AUTH_TOKEN": "env", "RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}
    assert parts.resolve_token(None, env, home) == ("env", "RAY_AUTH_TOKEN")
    assert parts.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "tok")}, home)[0] == "from-path"
    assert parts.resolve_token(None, {}, home) == ("from-home", "~/.ray/auth_token")
    assert parts.resolve_token(None, {}, tmp_path / "nobody")[0] is None
    assert parts.resolve_token(None, {"RAY_AUTH_MODE": "disabled"}, home)[0] is None
    with pytest.raises(UserError, match="RAY_AUTH_TOKEN_PATH"):
        parts.resolve_token(None, {"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, home)
    assert parts.auth_headers("t") == {"Authorization": "Bearer t"} and parts.auth_headers(None) == {}
    assert "needs its auth token" in parts.auth_error("Authentication required: ...", "http://h", "none")
    assert "refused the auth token (from RAY_AUTH_TOKEN)" in parts.auth_error("Authentication failed: ...",
                                                                           "http://h", "RAY_AUTH_TOKEN")


def test_submission_id_and_entrypoint():
    sid = parts.submission_id("my run/x", suffix="0a1b2c3d")
    assert sid == "rayft-my-run-x-0a1b2c3d"
    assert parts.submission_id("sft").startswith("rayft-sft-")
    assert parts.submission_id("sft") != parts.submission_id("sft")
    path = parts.staged_config_path(sid)
    assert path == ".rayft/submit/rayft-my-run-x-0a1b2c3d.yaml"
    assert parts.entrypoint(path) == f"python -m cluster.cli train {path}"
    assert parts.entrypoint("a b.yaml") == "python -m cluster.cli train 'a b.yaml'"


def test_job_config_clears_the_address_and_round_trips(tmp_path):
    config = load_config(_workspace(tmp_path) / "job.yaml", ["train.max_steps=3"])
    data = parts.job_config_dict(config)
    assert data["cluster"]["address"] is None and config.cluster.address == "ray://head:10001"
    again = from_dict(JobConfig, yaml.safe_load(yaml.safe_dump(data)))
    again.validate()
    assert again.train.max_steps == 3 and again.name == "my run"


def test_code_modules_skip_packages_the_working_dir_holds(tmp_path):
    root = Path(parts.__file__).resolve().parents[1]
    assert parts.code_modules(root) == []
    shipped = parts.code_modules(tmp_path)
    assert [Path(p).name for p in shipped] == list(parts.PACKAGES)


def test_runtime_env_and_env_vars(tmp_path):
    env = parts.runtime_env(tmp_path, ["/runs/"], ["/code/cluster"], {"HF_HOME": "/cache"})
    assert env == {"working_dir": str(tmp_path), "excludes": ["/runs/"], "py_modules": ["/code/cluster"],
                   "env_vars": {"HF_HOME": "/cache"}}
    assert "py_modules" not in parts.runtime_env(tmp_path, [], [], {})
    assert parts.parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    for bad in ("A", "=1", "1A=2"):
        with pytest.raises(UserError, match="KEY=VALUE"):
            parts.parse_env([bad])
    with pytest.raises(UserError, match="TOKENIZERS_PARALLELISM"):
        parts.parse_env(["TOKENIZERS_PARALLELISM=true"])


def test_excludes_match_like_ray(tmp_path):
    excludes = list(parts.DEFAULT_EXCLUDES)
    assert parts.excluded_by("runs/sft/final", excludes) == "/runs/"
    assert parts.excluded_by("pkg/__pycache__/m.pyc", excludes) == "__pycache__/"
    assert parts.excluded_by("models/tiny", excludes) is None
    assert parts.excluded_by("sub/runs/x", excludes) is None   # anchored: only the top-level runs/
    (tmp_path / ".rayignore").write_text("# comment\n\nbig/\n")
    assert parts.rayignore_patterns(tmp_path) == ["big/"]


def test_check_paths(tmp_path):
    ws = _workspace(tmp_path)
    base = load_config(ws / "job.yaml")
    parts.check_paths(base, ws, list(parts.DEFAULT_EXCLUDES))
    (ws / "runs/old/final").mkdir(parents=True)
    cases = {"model.path=models/missing": "does not exist",
             "model.path=../elsewhere": "outside the working directory",
             "model.path=runs/old": "excluded by '/runs/'",
             "data.eval=[data/none.jsonl]": "does not exist"}
    for override, message in cases.items():
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=message) as err:
            parts.check_paths(load_config(ws / "job.yaml", [override]), ws, list(parts.DEFAULT_EXCLUDES))
        assert err.value.key.startswith(key)
    parts.check_paths(load_config(ws / "job.yaml", ["model.path=/on/shared/storage"]), ws, [])   # the cluster's


def test_output_dir(tmp_path):
    ws = _workspace(tmp_path)
    assert parts.output_excludes(load_config(ws / "job.yaml", [f"output_dir={ws}/out"]), ws) == ["/out/"]
    assert parts.output_excludes(load_config(ws / "job.yaml", ["output_dir=/shared/runs"]), ws) == []
    assert parts.output_excludes(load_config(ws / "job.yaml", ["output_dir=."]), ws) == []
    assert "absolute path on shared storage" in parts.output_dir_warning(load_config(ws / "job.yaml"))
    assert parts.output_dir_warning(load_config(ws / "job.yaml", ["output_dir=/shared/runs"])) is None


def test_environ_restores(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "x")
    monkeypatch.delenv("RAYFT_T", raising=False)
    with parts.environ(drop=["RAY_ADDRESS"], set_={"RAYFT_T": "1"}):
        assert "RAY_ADDRESS" not in os.environ and os.environ["RAYFT_T"] == "1"
    assert os.environ["RAY_ADDRESS"] == "x" and "RAYFT_T" not in os.environ


def test_submit_dry_run_contacts_nothing(tmp_path, monkeypatch, capsys):
    ws = _workspace(tmp_path)
    monkeypatch.chdir(ws)
    rc = main(["submit", "job.yaml", "train.max_steps=2", "output_dir=/shared/runs", "--env", "HF_HOME=/c",
               "--exclude", "scratch/", "--submission-id", "fixed", "--dry-run", "--address", "http://127.0.0.1:1"])
    assert rc == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["submission_id"] == "fixed"
    assert plan["entrypoint"] == "python -m cluster.cli train .rayft/submit/fixed.yaml"
    assert plan["runtime_env"]["working_dir"] == str(ws) and "scratch/" in plan["runtime_env"]["excludes"]
    assert plan["runtime_env"]["env_vars"] == {"HF_HOME": "/c"} and len(plan["runtime_env"]["py_modules"]) == 4
    assert plan["metadata"]["rayft_run"] == "my run" and plan["config"]["train"]["max_steps"] == 2
    assert plan["config"]["cluster"]["address"] is None and not (ws / ".rayft").exists()


def test_submit_bad_config_exits_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_workspace(tmp_path))
    assert main(["submit", "job.yaml", "train.lr=fast", "--address", "http://127.0.0.1:1"]) == 2
    assert "train.lr" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["../../sft", "a/b", "/abs", ".hidden", "-flag", "", "x" * 101, "job id"])
def test_submission_id_that_could_name_a_path_is_refused(tmp_path, monkeypatch, capsys, bad):
    with pytest.raises(UserError, match="--submission-id"):
        parts.submission_id("sft", given=bad)
    ws = _workspace(tmp_path)
    monkeypatch.chdir(ws)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main(["submit", "job.yaml", f"--submission-id={bad}", "--address", "http://127.0.0.1:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--submission-id" in err[0]
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # nothing staged anywhere


def test_given_submission_id_is_kept():
    assert parts.submission_id("sft", given="team.sft-2_v1") == "team.sft-2_v1"
    assert parts.submission_id("my run/x", suffix="0a1b2c3d").startswith("rayft-my-run-x-")
