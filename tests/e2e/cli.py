"""Running `rayft` as a user does, for the e2e tests: a real subprocess (`python -m
cluster.cli`, this checkout's code first on the path), its exit status and output."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def rayft(*args, cwd=None, check=True, timeout=600, env=None):
    """Run `rayft ARGS` in `cwd` (default: the checkout); `env` adds variables (e.g.
    RAY_ADDRESS to join the session's cluster instead of starting one)."""
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=cwd or ROOT,
                          capture_output=True, text=True, env=full_env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"rayft {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_one_line_error(proc, *needles):
    """Exit status 2 and one `rayft: error:` line holding every needle."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rayft: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0]
