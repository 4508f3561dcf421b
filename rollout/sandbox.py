"""Running untrusted code (a model's answer, the tests it is judged by) in a confined
child process, and reporting what happened to each part of it.

    run = run_sandboxed([Section("solution", code, stop_on_error=True),
                         Section("test 1", "assert add(1, 2) == 3")], SandboxLimits(time_s=5))
    run.status            # "finished", "timeout", "memory" or "died"
    run.outcomes[1].ok    # whether test 1 ran without raising

Each run gets a fresh private directory, the only place the program may write (its
working directory, HOME and TMPDIR), and an environment with nothing of the caller's in
it. The child confines itself before running anything (`rollout/sandbox_child.py`
says how: resource limits, no capabilities, Landlock, seccomp); the caller enforces the
wall clock and kills the child's own process group, nothing else. Linux on x86_64 with
Landlock is required: elsewhere `check_sandbox` raises `SandboxUnavailable` and nothing
runs unconfined.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

CHILD = Path(__file__).with_name("sandbox_child.py")
STARTUP_GRACE_S = 2.0  # interpreter start-up and confinement, on top of the program's own time
STDERR_TAIL = 2000


class SandboxUnavailable(RuntimeError):
    """This machine cannot confine a child (no Landlock, another architecture...)."""


@dataclass(frozen=True)
class SandboxLimits:
    time_s: float = 5.0     # CPU seconds for the program; the wall clock allows time_s + STARTUP_GRACE_S
    memory_mb: int = 512    # address space
    file_mb: int = 16       # largest file it may write


@dataclass(frozen=True)
class Section:
    """One piece of code, run in the namespace the earlier sections left. Sections that
    share a `file` are numbered as one file in tracebacks (pad a section's source with
    newlines to keep its line numbers)."""
    name: str
    source: str
    stop_on_error: bool = False   # a failure here skips every later section
    file: str = ""                # default: the name


@dataclass
class Outcome:
    ok: bool
    type: Optional[str] = None      # the exception's type name, when it raised
    message: str = ""
    file: Optional[str] = None      # the innermost section file of the program it was raised from
    line: Optional[int] = None      # and its line there

    @property
    def refused(self) -> bool:
        """The sandbox denied an action (a write outside the directory, a fork, a socket)."""
        return self.type in ("PermissionError", "BlockingIOError") or (
            self.type == "OSError" and "Operation not permitted" in self.message)


@dataclass
class SandboxRun:
    status: str                                   # finished | timeout | memory | died
    outcomes: list[Outcome] = field(default_factory=list)   # one per section that ran
    exit_code: Optional[int] = None               # negative: killed by that signal
    stderr: str = ""                              # the end of the program's stderr

    def describe_death(self) -> str:
        if self.exit_code is not None and self.exit_code < 0:
            return f"killed by {signal.Signals(-self.exit_code).name}"
        return f"exited with status {self.exit_code} before the tests finished"


def run_sandboxed(sections: Sequence[Section], limits: SandboxLimits = SandboxLimits()) -> SandboxRun:
    """Run `sections` in order in one confined interpreter and report each one."""
    check_sandbox()
    return _run(sections, limits)


@functools.lru_cache(maxsize=1)
def _probe() -> Optional[str]:
    """Why this machine cannot confine a child, or None when it can."""
    if sys.platform != "linux":
        return f"the sandbox needs Linux (Landlock and seccomp); this is {sys.platform}"
    run = _run([Section("probe", "pass")], SandboxLimits(time_s=5, memory_mb=512))
    if run.status == "finished" and run.outcomes and run.outcomes[0].ok:
        return None
    return run.stderr.strip() or run.describe_death()


def check_sandbox() -> None:
    reason = _probe()
    if reason is not None:
        raise SandboxUnavailable(f"cannot run code in a sandbox on this machine: {reason}")


def _run(sections: Sequence[Section], limits: SandboxLimits) -> SandboxRun:
    with tempfile.TemporaryDirectory(prefix="rayft-sandbox-") as root:
        work = Path(root, "work")
        work.mkdir()
        nonce = secrets.token_hex(16)
        job = {"work": str(work), "nonce": nonce, "memory_mb": limits.memory_mb, "cpu_s": limits.time_s,
               "file_mb": limits.file_mb,
               "sections": [{"file": s.file or s.name, "source": s.source, "stop_on_error": s.stop_on_error}
                            for s in sections]}
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1"}
        paths = {name: Path(root, name) for name in ("report", "stdout", "stderr")}
        with open(paths["report"], "wb") as report, open(paths["stdout"], "wb") as out, \
                open(paths["stderr"], "wb") as err:
            job["report_fd"] = report.fileno()
            proc = subprocess.Popen([sys.executable, "-I", str(CHILD)], stdin=subprocess.PIPE, stdout=out,
                                    stderr=err, cwd=work, env=env, pass_fds=(report.fileno(),),
                                    start_new_session=True)
            timed_out = _communicate(proc, json.dumps(job).encode(), limits.time_s + STARTUP_GRACE_S)
        messages = _read_report(paths["report"])
        stderr = paths["stderr"].read_bytes()[-STDERR_TAIL:].decode("utf-8", "replace")
    setup = next((m["setup_error"] for m in messages if "setup_error" in m), None)
    if setup is not None:
        return SandboxRun("died", exit_code=proc.returncode, stderr=f"confinement failed: {setup}")
    outcomes = [Outcome(bool(m.get("ok")), m.get("type"), str(m.get("message") or ""), m.get("file"), m.get("line"))
                for m in messages if "section" in m]
    finished = any(m.get("done") == nonce for m in messages)
    status = "finished" if finished else _status_of(proc.returncode, timed_out, outcomes, stderr)
    return SandboxRun(status, outcomes, proc.returncode, stderr)


def _communicate(proc: subprocess.Popen, job: bytes, wall_s: float) -> bool:
    """Hand the job over and wait; past `wall_s`, kill the child's process group. True
    when it was killed for time."""
    try:
        proc.stdin.write(job)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died at start-up: its exit status says why
    try:
        proc.wait(timeout=wall_s)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: only the child and what it started
        proc.wait()
        return True


def _read_report(path: Path) -> list[dict]:
    messages = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue  # a torn last line, when the child died mid-write
        if isinstance(message, dict):
            messages.append(message)
    return messages


def _status_of(exit_code: Optional[int], timed_out: bool, outcomes: list[Outcome], stderr: str) -> str:
    if timed_out or exit_code == -signal.SIGXCPU:
        return "timeout"
    if (outcomes and outcomes[-1].type == "MemoryError") or "MemoryError" in stderr:
        return "memory"
    return "died"
