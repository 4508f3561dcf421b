"""The `code_tests` reward: the code in a response, run against the row's tests in the
sandbox (`rollout.sandbox`), scored by how many tests pass, with the reason a sample
lost its reward.

The row's `reference` holds the test code. Each top-level statement of it is a step:
an `assert` or a bare expression (`check(add)`, HumanEval's style) is a test; anything
else (imports, helper functions, assignments) is set-up, and a failing set-up step fails
every test after it. The response's code is the last fenced block (```python ... ```) if
it has one, else the whole response.

    code_tests("", "```python\\ndef add(a, b):\\n    return a + b\\n```", "assert add(1, 2) == 3", {})
    # -> (1.0, "passed 1/1 tests")
"""

from __future__ import annotations

import ast
import os
import re
from typing import Optional

from rollout.sandbox import SandboxLimits, SandboxRun, SandboxUnavailable, Section, check_sandbox, run_sandboxed

FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced block of the response (a python/py/unlabelled one), else all of it."""
    blocks = [body for lang, body in FENCE.findall(response) if lang.lower() in ("", "python", "py", "python3")]
    return blocks[-1] if blocks else response


def parse_tests(test_code: str) -> list[tuple[Section, bool]]:
    """(section, is_test) for each top-level statement of the test code."""
    try:
        tree = ast.parse(test_code)
    except SyntaxError as exc:
        raise ValueError(f"the reference (the test code) does not parse: {exc.msg} (line {exc.lineno})") from None
    steps, tests = [], 0
    for node in tree.body:
        is_test = isinstance(node, (ast.Assert, ast.Expr)) and not _is_docstring(node)
        tests += is_test
        name = f"test {tests}" if is_test else f"set-up line {node.lineno}"
        source = "\n" * (node.lineno - 1) + (ast.get_source_segment(test_code, node) or ast.unparse(node))
        steps.append((Section(name, source, stop_on_error=not is_test, file="tests"), is_test))
    if not tests:
        raise ValueError("the reference (the test code) holds no test: an assert statement or a call such as "
                         "check(candidate)")
    return steps


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def code_tests(prompt: str, response: str, reference: Optional[str], metadata: dict, timeout_s: float = 5.0,
               memory_mb: int = 512, partial: bool = False) -> tuple[float, str]:
    """1.0 when every test passes (with `partial`, the fraction that pass), with the
    reason; 0.0 on a timeout, memory exhaustion, crash or refused action."""
    if reference is None:
        raise ValueError("code_tests needs the test code as the row's `reference`")
    steps = parse_tests(str(reference))
    sections = [Section("solution", extract_code(response), stop_on_error=True)] + [s for s, _ in steps]
    limits = SandboxLimits(time_s=timeout_s, memory_mb=memory_mb)
    run = run_sandboxed(sections, limits)
    return judge(run, [is_test for _, is_test in steps], limits, partial)


def judge(run: SandboxRun, is_test: list[bool], limits: SandboxLimits, partial: bool) -> tuple[float, str]:
    """The reward and its reason for one sandbox run of [solution, *steps]."""
    total = sum(is_test)
    if run.status == "timeout":
        return 0.0, f"timeout: ran past {limits.time_s:g} s"
    if run.status == "memory" or any(outcome.type == "MemoryError" for outcome in run.outcomes):
        return 0.0, f"memory limit: needed more than {limits.memory_mb} MB"
    if run.status == "died":
        return 0.0, f"crash: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.describe_death()}"
    solution = run.outcomes[0]
    if not solution.ok:
        return 0.0, _failure("the solution", solution)
    steps = run.outcomes[1:]
    passed = sum(1 for k, outcome in enumerate(steps) if is_test[k] and outcome.ok)
    first_bad = next((k for k, outcome in enumerate(steps) if not outcome.ok), None)
    if first_bad is None and len(steps) == len(is_test):
        return 1.0, f"passed {total}/{total} tests"
    value = passed / total if partial else 0.0
    if first_bad is None:
        return value, f"passed {passed}/{total} tests; the rest did not run"
    number = sum(is_test[: first_bad + 1])
    where = f"test {number}/{total}" if is_test[first_bad] else f"the set-up before test {number + 1}"
    return value, f"passed {passed}/{total} tests; {_failure(where, steps[first_bad])}"


def _failure(where: str, outcome) -> str:
    detail = f"{outcome.type}: {outcome.message}" if outcome.message else str(outcome.type)
    in_own_file = (outcome.file == "solution") == (where == "the solution")
    line = "" if not outcome.line else f" (line {outcome.line})" if in_own_file else f" ({outcome.file} line {outcome.line})"
    if outcome.refused:
        return f"refused action in {where}{line}: {detail}"
    if outcome.type == "AssertionError":
        return f"failed {where}{line}" + (f": {outcome.message}" if outcome.message else "")
    return f"crash in {where}{line}: {detail}"


def check_params(params: dict) -> None:
    timeout_s, memory_mb = params.get("timeout_s", 5.0), params.get("memory_mb", 512)
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s <= 600:
        raise ValueError(f"timeout_s must be a number of seconds in (0, 600], got {timeout_s!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 64:
        raise ValueError(f"memory_mb must be an integer >= 64, got {memory_mb!r}")
    if not isinstance(params.get("partial", False), bool):
        raise ValueError(f"partial must be true or false, got {params['partial']!r}")
    try:
        check_sandbox()
    except SandboxUnavailable as exc:
        raise ValueError(str(exc)) from None


# Samples scored at once: each runs in its own process, so threads overlap them.
code_tests.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
