"""Replacing a directory a user keeps (a run's `final/`, an export target) so that a crash
at any point leaves a whole model on disk, old or new, never a partial one or none.

`replace_dir(X, write)` goes through these steps; the states a crash can leave behind,
and what the next `replace_dir` or `recover_dir` does with each:

1. `write(X.tmp)`               crash -> X (old) + partial X.tmp: X.tmp is discarded
2. rename X -> X.old            crash -> X.old + whole X.tmp, no X: X.old is put back
3. rename X.tmp -> X            crash -> X (new) + X.old: X.old is removed
4. remove X.old

Each rename is atomic (same parent directory), so a reader that looks for X finds the
old model or the new one; only between steps 2 and 3 is there briefly no X, and a reader
that then calls `recover_dir` puts the old one back.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable


def staging_path(target: Path) -> Path:
    return target.with_name(target.name + ".tmp")


def aside_path(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def replace_dir(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a new `target` with `write(directory)` and swap it in; returns `target`."""
    target = Path(target)
    recover_dir(target)
    tmp = staging_path(target)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crash in step 1
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    set_aside(target)
    move_in(target)
    drop_aside(target)
    return target


def set_aside(target: Path) -> None:
    """Step 2: the old directory (if any) moves to X.old."""
    if target.exists():
        os.replace(target, aside_path(target))


def move_in(target: Path) -> None:
    """Step 3: the staged directory becomes X."""
    os.replace(staging_path(target), target)


def drop_aside(target: Path) -> None:
    """Step 4: the old directory goes, now that the new one is in place."""
    shutil.rmtree(aside_path(target), ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Bring `target` back to one whole directory after a crash inside `replace_dir`
    (see the module docstring); a no-op when nothing was interrupted. Readers may call
    it: it never touches X.tmp, which a live writer may be filling."""
    target, old = Path(target), aside_path(target)
    if old.exists() and not target.exists():
        os.replace(old, target)  # a crash between steps 2 and 3: the old model is the whole one
    elif old.exists():
        drop_aside(target)  # a crash between steps 3 and 4: the new one is in place
