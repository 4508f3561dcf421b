"""The parts of `rayft submit` that contact nothing: which cluster and token, what the job
runs, what it uploads, and the checks that refuse a job before it reaches the cluster."""

from __future__ import annotations

import contextlib
import os
import re
import time
import secrets
import shlex
from pathlib import Path
from typing import Mapping

from cluster.config import to_dict
from rollout.refs import is_file_ref
from trainers.errors import ConfigError, UserError

# Where `rayft submit` stages the resolved config inside the uploaded working directory.
STAGE_DIR = ".rayft/submit"
# The rayft packages; shipped as py_modules when the working directory does not hold them.
PACKAGES = ("cluster", "trainers", "rollout", "services")
# Never uploaded (gitignore-style patterns, relative to the working directory). Run
# directories can be large and belong on shared storage; the config is staged separately.
DEFAULT_EXCLUDES = (".git/", ".venv/", "venv/", "__pycache__/", "*.pyc", ".pytest_cache/", "*.egg-info/",
                    "/build/", "/runs/", "/benchmarks/results/", ".rayft/jobs/")
ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def resolve_address(flag: str | None, config_address: str | None = None,
                    environ: Mapping[str, str] = os.environ) -> tuple[str, str]:
    """(address, where it came from): --address, then the config's cluster.address, then
    Ray's RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else Ray's 'auto' (a cluster on this machine)."""
    if flag:
        return flag, "--address"
    if config_address:
        return config_address, "cluster.address"
    for name in ADDRESS_ENV:
        if environ.get(name):
            return environ[name], name
    return "auto", "default"


def address_kind(address: str) -> str:
    """http: the dashboard URL itself; ray-client: ray://host:10001; module: another
    scheme, handed to Ray's job SDK as is; cluster: 'auto' or a GCS host:port, looked up."""
    if address.startswith(("http://", "https://")):
        return "http"
    if address.startswith("ray://"):
        return "ray-client"
    return "module" if "://" in address else "cluster"


def resolve_token(flag: str | None, environ: Mapping[str, str] = os.environ,
                  home: Path | None = None) -> tuple[str | None, str]:
    """(token or None, its source), in Ray's order: --auth-token, RAY_AUTH_TOKEN,
    the file RAY_AUTH_TOKEN_PATH names, ~/.ray/auth_token. RAY_AUTH_MODE=disabled
    sends nothing unless the flag asks."""
    if flag:
        return flag.strip(), "--auth-token"
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None, "RAY_AUTH_MODE=disabled"
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file():
            raise UserError(f"RAY_AUTH_TOKEN_PATH={environ['RAY_AUTH_TOKEN_PATH']}: no such file")
        return path.read_text(encoding="utf-8").strip() or None, "RAY_AUTH_TOKEN_PATH"
    default = (home or Path.home()) / ".ray" / "auth_token"
    if default.is_file():
        return default.read_text(encoding="utf-8").strip() or None, "~/.ray/auth_token"
    return None, "none"


def auth_headers(token: str | None) -> dict[str, str]:
    """The header Ray's dashboard checks under token authentication."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def auth_error(message: str, url: str, token_source: str) -> str:
    """One line for Ray's AuthenticationError: no token (401) or a wrong one (403)."""
    if "Authentication required" in message:
        return (f"the cluster at {url} needs its auth token: set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH, "
                "pass --auth-token, or put it in ~/.ray/auth_token")
    return f"the cluster at {url} refused the auth token (from {token_source})"


def submission_id(run_name: str, suffix: str | None = None, given: str | None = None) -> str:
    """The job id: `given` (--submission-id) once checked, else rayft-<run name>-<8 hex>:
    unique, and tells at a glance which run a job is."""
    if given is None:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_name).strip("-.")[:40] or "run"
        given = f"rayft-{safe}-{suffix or secrets.token_hex(4)}"
    return check_submission_id(given)


def check_submission_id(sid: str, flag: str = "--submission-id") -> str:
    """A job id is also a file name in the staging directory: letters, digits, `_ . -`,
    starting with a letter or digit, so it can never name a path outside it."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", sid):
        raise UserError(f"{flag} '{sid}': use 1 to 100 letters, digits, '_', '.' or '-', starting with a "
                        "letter or digit")
    return sid


def staged_config_path(sid: str) -> str:
    return f"{STAGE_DIR}/{sid}.yaml"


def job_config_dict(config) -> dict:
    """The resolved config the job runs. cluster.address is cleared: inside a Ray Job the
    run joins the cluster the job runs on (Ray sets RAY_ADDRESS for the job's driver)."""
    data = to_dict(config)
    data["cluster"]["address"] = None
    return data


def entrypoint(config_relpath: str, python: str = "python") -> str:
    """The job's shell command, run in the unpacked working directory on the cluster."""
    return f"{python} -m cluster.cli train {shlex.quote(config_relpath)}"


def code_modules(working_dir: Path, code_root: Path | None = None) -> list[str]:
    """rayft's package directories the working directory does not already hold at its top
    level; shipped as py_modules, so the job runs the code that validated its config."""
    root = code_root or Path(__file__).resolve().parents[1]
    out = []
    for name in PACKAGES:
        package = (root / name).resolve()
        if package.is_dir() and (Path(working_dir) / name).resolve() != package:
            out.append(str(package))
    return out


def runtime_env(working_dir: Path, excludes: list[str], py_modules: list[str],
                env_vars: dict[str, str]) -> dict:
    env: dict = {"working_dir": str(working_dir), "excludes": list(excludes)}
    if py_modules:
        env["py_modules"] = list(py_modules)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def parse_env(items: list[str]) -> dict[str, str]:
    """--env KEY=VALUE items -> env_vars. The keys rayft's driver sets in its own
    ray.init runtime env are refused: Ray will not merge one variable from both."""
    from cluster.ray_env import _WORKER_ENV

    reserved = {*_WORKER_ENV, "DS_ACCELERATOR"}
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UserError(f"--env '{item}' must look like KEY=VALUE")
        if key in reserved:
            raise UserError(f"--env {key}: rayft sets it in the job itself")
        out[key] = value
    return out


def rayignore_patterns(working_dir: Path) -> list[str]:
    path = Path(working_dir) / ".rayignore"
    if not path.is_file():
        return []
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def excluded_by(relpath: str, patterns: list[str]) -> str | None:
    """The first gitignore-style pattern (Ray's matcher) that leaves relpath out, or None."""
    from services.ray_compat import path_spec

    for pattern in patterns:
        if path_spec([pattern]).match_file(relpath):
            return pattern
    return None


def config_paths(config) -> list[tuple[str, str]]:
    """(config key, path) of every file or directory a run reads."""
    out = [("model.path", config.model.path)]
    for section in ("train", "eval", "replay"):
        out += [(f"data.{section}[{i}].path", s.path) for i, s in enumerate(getattr(config.data, section))]
    if config.spec.teacher and config.distill.teacher:
        out.append(("distill.teacher", config.distill.teacher))
    if config.spec.rewards:
        for i, term in enumerate(config.rewards.rewards):
            fn = term.fn if isinstance(term.fn, str) else ""
            where = fn[len("model:"):] if fn.startswith("model:") else fn.rpartition(":")[0]
            if fn.startswith("model:") or where.endswith(".py") or "/" in where:
                out.append((f"rewards.rewards[{i}].fn", where))
    if is_file_ref(config.rollout.environment):
        out.append(("rollout.environment", config.rollout.environment.rpartition(":")[0]))
    return [(key, path) for key, path in out if path]


def check_paths(config, working_dir: Path, excludes: list[str]) -> None:
    """Refuse a relative path the job would not find: missing here, outside the working
    directory, or left out of the upload. Absolute paths are the cluster's to resolve."""
    working_dir = Path(working_dir)
    for key, path in config_paths(config):
        if Path(path).expanduser().is_absolute():
            continue
        rel = os.path.normpath(path)
        if rel == ".." or rel.startswith("../"):
            raise ConfigError(key, f"'{path}' is outside the working directory {working_dir}, the only files "
                                   "the job receives; use an absolute path the cluster's nodes can read")
        if not (working_dir / rel).exists():
            raise ConfigError(key, f"'{path}' does not exist in the working directory {working_dir}")
        pattern = excluded_by(rel, excludes)
        if pattern:
            raise ConfigError(key, f"'{path}' is not uploaded with the job (excluded by '{pattern}'); "
                                   "use an absolute path the cluster's nodes can read")


def output_excludes(config, working_dir: Path) -> list[str]:
    """The run directories' parent, when it lies inside the working directory: not uploaded."""
    working_dir = Path(working_dir).resolve()
    out = (working_dir / Path(config.output_dir).expanduser()).resolve()
    if out == working_dir or not out.is_relative_to(working_dir):
        return []
    return [f"/{out.relative_to(working_dir).as_posix()}/"]


def output_dir_warning(config) -> str | None:
    if Path(config.output_dir).expanduser().is_absolute():
        return None
    return (f"warning: output_dir '{config.output_dir}' is relative: the run directory lands inside the job's "
            "temporary working directory on the cluster; set output_dir to an absolute path on shared storage")


@contextlib.contextmanager
def environ(drop=(), set_=None):
    """Drop and set environment variables for the block, then restore them."""
    saved = {k: os.environ.get(k) for k in (*drop, *(set_ or {}))}
    for key in drop:
        os.environ.pop(key, None)
    os.environ.update(set_ or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def clock(ms) -> str:
    """A Ray job time (ms since the epoch) in local time."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def details(info) -> dict:
    """A Ray JobDetails as plain JSON-able data."""
    return {"submission_id": info.submission_id, "status": info.status.value, "message": info.message,
            "run": (info.metadata or {}).get("rayft_run"), "entrypoint": info.entrypoint,
            "start_time": info.start_time, "end_time": info.end_time, "driver_exit_code": info.driver_exit_code,
            "metadata": info.metadata}
