"""`rayft submit` and `rayft jobs` against a real Ray cluster started here with
`ray start --head --block` (dashboard and job server on, token authentication on).
Only this cluster's processes are stopped at the end, by their PIDs:
`ray stop` would stop every Ray cluster on the machine."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.e2e.cli import rayft

CONFIG = {
    "method": "sft", "name": "sft", "model": {"path": "models/tiny"},
    "data": {"train": ["data/addition.jsonl"], "eval_fraction": 0.1, "max_length": 64},
    "peft": {"method": "lora", "r": 8, "alpha": 16, "target_modules": ["all-linear"]},
    "train": {"max_steps": 4, "batch_size": 8, "lr": 3.0e-3, "eval_every": 2, "save_every": 0},
    "cluster": {"num_workers": 1},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            return   # 401 under token authentication: the server is up
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no dashboard at {url} after {timeout}s")


@pytest.fixture(scope="module")
def cluster():
    temp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))   # short: unix socket paths are limited
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"   # the job's `python`
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"   # SIGTERM: tear down at once, no drain wait
    env["RAY_AUTH_MODE"] = "token"   # as Ray's default; it keeps or writes ~/.ray/auth_token for clients
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--port=0",
           f"--dashboard-port={dashboard}", f"--ray-client-server-port={_free_port()}",
           f"--dashboard-agent-listen-port={_free_port()}", "--num-cpus=4", f"--temp-dir={temp}",
           "--include-dashboard=true", "--disable-usage-stats"]
    log = open(temp / "ray-start.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_http(f"{url}/api/version", proc)
        yield url
    finally:
        procs = psutil.Process(proc.pid).children(recursive=True)   # gcs, raylet, dashboard, workers, jobs
        proc.terminate()   # `ray start --block` stops its node's processes on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _stop(procs, timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _stop(procs: list, timeout: float) -> None:
    """Wait for these processes to end (zombies count as ended), then kill what is left."""
    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    ws = tmp_path_factory.mktemp("jobs-ws")
    rayft("init-model", "--preset", "tiny", "--out", ws / "models/tiny")
    rayft("data", "synth", "--task", "addition", "--n", "64", "--out", ws / "data/addition.jsonl")
    (ws / "sft.yaml").write_text(yaml.safe_dump(CONFIG))
    return ws


def _job_id(stdout: str) -> str:
    match = re.search(r"^job (rayft-\S+) submitted to ", stdout, re.M)
    assert match, stdout
    return match.group(1)


def test_help():
    for args in (["submit", "--help"], ["jobs", "--help"], ["jobs", "list", "--help"], ["jobs", "stop", "--help"]):
        proc = rayft(*args)
        assert "usage:" in proc.stdout and len(proc.stdout) > 300


def test_bad_config_refused_before_contacting_the_cluster(workspace):
    for override, key in (("train.lr=fast", "train.lr"), ("train.learning_rate=1", "train.learning_rate"),
                          ("model.path=models/missing", "model.path")):
        proc = rayft("submit", "sft.yaml", override, "--address", "http://127.0.0.1:1", cwd=workspace, check=False)
        assert proc.returncode == 2, proc.stderr
        assert key in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "cannot reach" not in proc.stderr
    assert not (workspace / ".rayft").exists()


def test_submit_follow_runs_sft_to_success(cluster, workspace):
    out = workspace / "out"   # absolute, as on shared storage; inside the working dir, so not uploaded
    proc = rayft("submit", "sft.yaml", f"output_dir={out}", "--address", cluster, "--follow", cwd=workspace)
    sid = _job_id(proc.stdout)
    assert sid.startswith("rayft-sft-") and f"job {sid} SUCCEEDED" in proc.stdout
    assert "run directory:" in proc.stdout   # the job's own output, streamed
    run = out / "sft"
    assert (run / "final/adapter_config.json").is_file()
    assert json.loads((run / "summary.json").read_text())["steps"] == 4
    ran = yaml.safe_load((run / "config.yaml").read_text())   # the resolved config the job ran
    assert ran["train"]["max_steps"] == 4 and ran["cluster"]["address"] is None
    assert not (workspace / ".rayft").exists()   # the staged config is not left behind

    listing = rayft("jobs", "list", "--address", cluster).stdout
    assert re.search(rf"^{sid}\s+SUCCEEDED\s+sft\s", listing, re.M), listing
    info = json.loads(rayft("jobs", "status", sid, "--address", cluster, "--json").stdout)
    assert info["status"] == "SUCCEEDED" and info["run"] == "sft" and info["driver_exit_code"] == 0
    assert info["entrypoint"] == f"python -m cluster.cli train .rayft/submit/{sid}.yaml"
    assert "run directory:" in rayft("jobs", "logs", sid, "--address", cluster).stdout
    unknown = rayft("jobs", "status", "rayft-nope", "--address", cluster, check=False)
    assert unknown.returncode == 2 and "no job 'rayft-nope'" in unknown.stderr
    again = rayft("submit", "sft.yaml", f"output_dir={out}", "--submission-id", sid, "--address", cluster,
                  cwd=workspace, check=False)   # a taken id: refused in one line, nothing left behind
    assert again.returncode == 2 and "refused" in again.stderr and "already exists" in again.stderr
    assert not (workspace / ".rayft").exists()


def test_stop_running_job(cluster, workspace):
    out = workspace / "out"
    proc = rayft("submit", "sft.yaml", "name=long", "train.max_steps=100000", f"output_dir={out}",
                 "--address", cluster, cwd=workspace)
    sid = _job_id(proc.stdout)
    deadline = time.monotonic() + 90
    while "training sft on" not in rayft("jobs", "logs", sid, "--address", cluster).stdout:   # mid-run
        assert time.monotonic() < deadline, rayft("jobs", "logs", sid, "--address", cluster).stdout
        time.sleep(1)
    stopped = rayft("jobs", "stop", sid, "--address", cluster)
    assert f"{sid}: STOPPED" in stopped.stdout
    assert rayft("jobs", "status", sid, "--address", cluster).stdout.startswith(f"{sid}: STOPPED")
    assert not (out / "long/summary.json").exists()
    deadline = time.monotonic() + 30   # the job's driver is gone, not just marked stopped
    while any(sid in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.monotonic() < deadline, "the stopped job's driver is still running"
        time.sleep(0.5)


def test_wrong_token_refused(cluster):
    proc = rayft("jobs", "list", "--address", cluster, "--auth-token", "wrong", check=False)
    assert proc.returncode == 2 and "refused the auth token" in proc.stderr
