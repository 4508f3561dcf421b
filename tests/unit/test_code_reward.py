"""The sandboxed `code_tests` reward: scores and reasons computed by hand, and containment
of programs that write outside their directory, loop, fork, allocate without bound, open
sockets, or read the host's files; every one of them is a 0 with a reason, and the batch
goes on."""

import socket
import textwrap

import pytest

from rollout.code_reward import code_tests, extract_code, parse_tests
from rollout.rewards import RewardError, RewardItem, Rewards, RewardSpec, RewardTerm
from rollout.sandbox import Section, SandboxLimits, run_sandboxed

ADD_TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4"
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"


def score(response, tests=ADD_TESTS, **params):
    return code_tests("", response, tests, {}, **{"timeout_s": 2.0, **params})


def test_passing_code_gets_1_with_the_test_count():
    assert score(GOOD) == (1.0, "passed 3/3 tests")


def test_a_failing_test_is_named_and_partial_credit_counts_passed_tests():
    wrong = "def add(a, b):\n    return a + b if a != 2 else 5"   # wrong only on the third test
    value, reason = score(wrong)
    assert value == 0.0 and reason == "passed 2/3 tests; failed test 3/3 (line 3)"
    assert score(wrong, partial=True)[0] == pytest.approx(2 / 3)


def test_set_up_steps_and_humaneval_style_checks():
    tests = textwrap.dedent("""\
        import math
        def check(candidate):
            assert candidate(2, 3) == 5, "2 + 3"
        check(add)
        assert math.isclose(add(0.1, 0.2), 0.3)
        """)
    assert [(s.name, is_test) for s, is_test in parse_tests(tests)] == [
        ("set-up line 1", False), ("set-up line 2", False), ("test 1", True), ("test 2", True)]
    assert score(GOOD, tests) == (1.0, "passed 2/2 tests")
    value, reason = score("def add(a, b):\n    return a - b", tests)
    assert value == 0.0 and reason.startswith("passed 0/2 tests; failed test 1/2 (line 3): 2 + 3")


def test_a_crash_in_the_solution_is_a_crash_with_its_line():
    value, reason = score("def add(a, b):\n    return a + b\nundefined_name")
    assert value == 0.0 and reason == "crash in the solution (line 3): NameError: name 'undefined_name' is not defined"
    value, reason = score("def add(a, b) return")
    assert value == 0.0 and reason.startswith("crash in the solution") and "SyntaxError" in reason


def test_exiting_before_the_tests_is_not_a_pass():
    value, reason = score("import os\nos._exit(0)")
    assert value == 0.0 and reason == "crash: exited with status 0 before the tests finished"


def test_extract_code_takes_the_last_python_block():
    text = "First:\n```python\nx = 1\n```\nthen\n```bash\nls\n```\nfinal:\n```py\ndef add(a, b): return a + b\n```"
    assert extract_code(text) == "def add(a, b): return a + b\n"
    assert extract_code("def f(): pass") == "def f(): pass"


def test_bad_test_code_and_params_are_errors_naming_the_reward():
    with pytest.raises(ValueError, match="holds no test"):
        parse_tests("def helper(): pass")
    with pytest.raises(ValueError, match="does not parse"):
        parse_tests("assert (")
    with pytest.raises(RewardError, match="reward 'code_tests': timeout_s must be"):
        Rewards(RewardSpec([RewardTerm("code_tests", params={"timeout_s": 0})]))
    with pytest.raises(RewardError, match="reward 'code_tests' raised on sample 0.*needs the test code"):
        Rewards(RewardSpec([RewardTerm("code_tests")])).score([RewardItem("q", GOOD)])


def test_hostile_programs_are_contained_and_the_batch_goes_on(tmp_path):
    kept = tmp_path / "kept.txt"
    kept.write_text("precious")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    port = listener.getsockname()[1]
    hostile = {
        "write outside": f"open({str(tmp_path / 'planted.txt')!r}, 'w').write('x')",
        "overwrite": f"open({str(kept)!r}, 'w').write('gone')",
        "delete": f"import os\nos.remove({str(kept)!r})",
        "loop": "while True:\n    pass",
        "sleep": "import time\ntime.sleep(60)",
        "fork": "import os\nwhile True:\n    os.fork()",
        "subprocess": "import subprocess\nsubprocess.run(['touch', " + repr(str(tmp_path / "touched")) + "])",
        "allocate": "hoard = []\nwhile True:\n    hoard.append(bytearray(10 ** 7))",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {port})).send(b'hi')",
        "read host": "print(open('/etc/hostname').read())",
        "signal": "import os\nos.kill(1, 9)",
    }
    items = [RewardItem("q", f"```python\n{code}\n```", ADD_TESTS) for code in hostile.values()]
    items.insert(3, RewardItem("q", GOOD, ADD_TESTS))
    spec = RewardSpec([RewardTerm("code_tests", params={"timeout_s": 1.0, "memory_mb": 256})])
    results = Rewards(spec).score(items)
    reasons = dict(zip(["write outside", "overwrite", "delete", "good", *list(hostile)[3:]],
                       [r.reasons["code_tests"] for r in results]))
    assert results[3].reward == 1.0 and reasons.pop("good") == "passed 3/3 tests"
    assert [r.reward for k, r in enumerate(results) if k != 3] == [0.0] * len(hostile)
    for name in ("write outside", "overwrite", "delete", "fork", "subprocess", "socket", "read host", "signal"):
        assert reasons[name].startswith("refused action in the solution"), (name, reasons[name])
    assert reasons["loop"] == reasons["sleep"] == "timeout: ran past 1 s"
    assert reasons["allocate"] == "memory limit: needed more than 256 MB"
    assert kept.read_text() == "precious" and sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing ever connected
    listener.close()


def test_the_program_may_write_in_its_own_directory_only():
    run = run_sandboxed([Section("write", "open('notes.txt', 'w').write('ok')\nimport os, tempfile\n"
                                          "assert open(os.path.join(tempfile.gettempdir(), 'notes.txt')).read() == 'ok'"),
                         Section("env", "import os\nassert set(os.environ) <= {'PATH', 'HOME', 'TMPDIR', 'LANG', "
                                        "'PYTHONDONTWRITEBYTECODE', 'LC_CTYPE'}, sorted(os.environ)")],
                        SandboxLimits(time_s=2))
    assert run.status == "finished" and [o.ok for o in run.outcomes] == [True, True], run.outcomes
