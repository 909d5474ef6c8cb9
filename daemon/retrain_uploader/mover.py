"""Moves a job's sources out of the inbox and writes the error file of a failed job.

Moves are planned first (the targets are stored in the ledger), then carried out; carrying out a plan again after
a crash is harmless: a source already at its target is left alone. ``done/`` and ``failed/`` live inside the inbox,
so each move is a rename on one filesystem: atomic, never a copy.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["apply_moves", "plan_moves", "plan_result_name", "rename_no_replace", "write_error_file"]

_KNOWN_SUFFIXES = (".train.csv", ".eval.csv", ".csv", ".zip")
_MAX_NAME_BYTES = 240


def _with_tag(name: str, tag: str) -> str:
    lower = name.lower()
    for suffix in _KNOWN_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return f"{name[: -len(suffix)]}.{tag}{name[-len(suffix) :]}"
    return f"{name}.{tag}"


def _fits(name: str) -> bool:
    return name.isprintable() and len(name.encode("utf-8", "surrogateescape")) <= _MAX_NAME_BYTES


def plan_moves(
    inbox: Path, sources: Sequence[str], dest: str, *, job_id: int, error_stem: str | None = None
) -> list[str]:
    """Free target names (relative to ``inbox``) for each source, plus the error file's when ``error_stem`` is set.

    A name already taken in ``dest`` (the same file name dropped before) gets the job id added: ``NAME.job7.csv``.
    """
    folder = inbox / dest
    folder.mkdir(exist_ok=True)
    targets: list[str] = []
    tag = f"job{job_id}"
    for name in sources:
        candidate = name if _fits(name) else f"{tag}.dropped"
        if os.path.lexists(folder / candidate):
            candidate = _with_tag(candidate, tag)
        targets.append(f"{dest}/{candidate}")
    if error_stem is not None:
        error_name = f"{error_stem}.error.json"
        if not _fits(error_name):
            error_name = f"{tag}.error.json"
        if os.path.lexists(folder / error_name):
            error_name = (
                f"{error_stem}.{tag}.error.json" if _fits(f"{error_stem}.{tag}.error.json") else f"{tag}.error.json"
            )
        targets.append(f"{dest}/{error_name}")
    return targets


def plan_result_name(inbox: Path, stem: str, *, job_id: int, dest: str = "done") -> Path:
    """Where a job's retraining result goes: ``done/NAME.result.zip``, or ``NAME.jobN.result.zip`` if taken."""
    folder = inbox / dest
    folder.mkdir(exist_ok=True)
    name = f"{stem}.result.zip"
    if not _fits(name) or os.path.lexists(folder / name):
        name = (
            f"{stem}.job{job_id}.result.zip" if _fits(f"{stem}.job{job_id}.result.zip") else f"job{job_id}.result.zip"
        )
    return folder / name


def apply_moves(inbox: Path, sources: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Rename each source to its planned target (which was free when planned: only the daemon writes there).

    Returns the sources that were in neither place (the user took them). Never renames over an existing file.
    """
    missing: list[str] = []
    for name, target in zip(sources, targets, strict=False):
        src, dst = inbox / name, inbox / target
        if os.path.lexists(dst):
            # Moved already (a replay after a crash). Whatever now stands at `src` is a newer drop by the user and
            # must not be renamed over it: it stays in the inbox and becomes a job of its own.
            continue
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            missing.append(name)
    _fsync_dir(inbox)
    for folder in {(inbox / t).parent for t in targets}:
        _fsync_dir(folder)
    return missing


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError): a hard link fails atomically if it does.

    On a filesystem without hard links, falls back to check-then-rename (a narrow race, with our own files only).
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def write_error_file(path: Path, content: dict[str, Any]) -> None:
    """Write ``content`` as pretty JSON, atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = json.dumps(content, ensure_ascii=False, indent=2) + "\n"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
