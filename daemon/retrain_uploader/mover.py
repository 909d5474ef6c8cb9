"""Moves a job's sources out of the inbox and writes the error file of a failed job.

Moves are planned first (the targets are stored in the ledger), then carried out; carrying out a plan again after
a crash is harmless: a source already at its target is left alone. ``done/`` and ``failed/`` live inside the inbox,
so a move is normally a rename: atomic. Either may be a symlink to an archive on another filesystem; there a move is
done like ``mv``: copy to a hidden name in the target folder, fsync, rename to the target without replacing, fsync
the folder, unlink the source. A replay after a crash at any point neither loses nor duplicates a file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

__all__ = ["apply_moves", "fits", "plan_moves", "plan_result_name", "rename_no_replace", "with_tag", "write_error_file"]

_KNOWN_SUFFIXES = (".train.csv", ".eval.csv", ".csv", ".zip")
_MAX_NAME_BYTES = 240


def with_tag(name: str, tag: str) -> str:
    lower = name.lower()
    for suffix in _KNOWN_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return f"{name[: -len(suffix)]}.{tag}{name[-len(suffix) :]}"
    return f"{name}.{tag}"


def fits(name: str) -> bool:
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
        candidate = name if fits(name) else f"{tag}.dropped"
        if os.path.lexists(folder / candidate):
            candidate = with_tag(candidate, tag)
        targets.append(f"{dest}/{candidate}")
    if error_stem is not None:
        error_name = f"{error_stem}.error.json"
        if not fits(error_name):
            error_name = f"{tag}.error.json"
        if os.path.lexists(folder / error_name):
            error_name = (
                f"{error_stem}.{tag}.error.json" if fits(f"{error_stem}.{tag}.error.json") else f"{tag}.error.json"
            )
        targets.append(f"{dest}/{error_name}")
    return targets


def plan_result_name(
    inbox: Path, stem: str, *, job_id: int, dest: str = "done", claimed: Collection[Path] = ()
) -> Path:
    """Where a job's retraining result goes: ``done/NAME.result.zip``, or ``NAME.jobN.result.zip`` if taken (by a file,
    or ``claimed`` by another job's download under way)."""
    folder = inbox / dest
    folder.mkdir(exist_ok=True)
    name = f"{stem}.result.zip"
    if not fits(name) or os.path.lexists(folder / name) or folder / name in claimed:
        name = (
            f"{stem}.job{job_id}.result.zip" if fits(f"{stem}.job{job_id}.result.zip") else f"job{job_id}.result.zip"
        )
    return folder / name


def same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` are two names of one file (a hard link); False if either is missing."""
    try:
        x, y = os.lstat(a), os.lstat(b)
    except OSError:
        return False
    return (x.st_dev, x.st_ino) == (y.st_dev, y.st_ino)


def result_part(dest: Path, job_id: int) -> Path:
    """The hidden name job ``job_id``'s result is downloaded to, beside ``dest`` (see ``Client.download``)."""
    return dest.with_name(f".{dest.name}.job{job_id}.part")


_RESULT_PART = re.compile(r"\.(?P<dest>.+\.result\.zip)\.job(?P<job>[0-9]+)\.part")


def parse_result_part(name: str) -> tuple[str, int] | None:
    """(the result's name, the job's id) of a name :func:`result_part` made, else None."""
    m = _RESULT_PART.fullmatch(name)
    return None if m is None else (m["dest"], int(m["job"]))


def apply_moves(inbox: Path, sources: Sequence[str], targets: Sequence[str]) -> list[str]:
    """Move each source to its planned target (which was free when planned: only the daemon writes there).

    Returns the sources that were in neither place (the user took them). Never moves over an existing file.
    """
    missing: list[str] = []
    for name, target in zip(sources, targets, strict=False):
        src, dst = inbox / name, inbox / target
        if os.path.lexists(dst):
            # Moved already (a replay after a crash). Whatever now stands at `src` is a newer drop by the user and
            # must not be moved over it: it stays in the inbox and becomes a job of its own; unless the move was a
            # copy to another filesystem that crashed before it removed its source.
            _drop_copied_source(src, dst)
            continue
        try:
            os.rename(src, dst)
        except FileNotFoundError:
            _part_name(dst).unlink(missing_ok=True)
            missing.append(name)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            try:
                _move_across(src, dst)
            except FileNotFoundError:
                missing.append(name)
    _fsync_dir(inbox)
    for folder in {(inbox / t).parent for t in targets}:
        _fsync_dir(folder)
    return missing


def link_no_replace(src: Path, dst: Path) -> bool:
    """A second name ``dst`` for ``src`` unless ``dst`` exists (FileExistsError): a hard link fails atomically if it
    does. True when ``src`` is kept (linked).

    On a filesystem without hard links, ``src`` is renamed to ``dst`` instead, after a check that ``dst`` is free (a
    narrow race, with our own files only); across filesystems, copied (see the module's docstring): False.
    """
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, "target exists", str(dst)) from None
        try:
            os.rename(src, dst)
        except OSError as e2:
            if e2.errno != errno.EXDEV:
                raise
            _move_across(src, dst)
        return False
    return True


def rename_no_replace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError), by :func:`link_no_replace` and an unlink."""
    if link_no_replace(src, dst):
        os.unlink(src)


# What os.link raises where a hard link cannot be made (the filesystem has none, another device, too many links).
_NO_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)


def _part_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.moving")


def _move_across(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` on another filesystem, like ``mv``; FileNotFoundError if ``src`` is gone."""
    part = _part_name(dst)  # hidden, and a fixed name: a replay overwrites what a crash left half-written
    st = os.lstat(src)
    if stat.S_ISLNK(st.st_mode):
        part.unlink(missing_ok=True)
        os.symlink(os.readlink(src), part)
    elif stat.S_ISFIFO(st.st_mode):
        part.unlink(missing_ok=True)
        os.mkfifo(part, stat.S_IMODE(st.st_mode))
    elif stat.S_ISREG(st.st_mode):
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with open(fd, "rb") as fin, open(part, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
            fout.flush()
            os.fsync(fout.fileno())
        # The source's times and mode, as mv keeps them; the time also tells a replay the copy from a new drop.
        os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
        with contextlib.suppress(OSError):  # some archive filesystems have no modes
            os.chmod(part, stat.S_IMODE(st.st_mode))
    else:
        raise OSError(errno.EXDEV, "cannot copy this kind of file to another filesystem", str(src))
    try:
        rename_no_replace(part, dst)  # same folder: a link or a rename, never a copy
    except FileExistsError:
        part.unlink(missing_ok=True)
        raise
    _fsync_dir(dst.parent)
    now = os.lstat(src)
    if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns):
        os.unlink(src)  # still the file copied: a file the user put there meanwhile stays
    _fsync_dir(src.parent)


def _drop_copied_source(src: Path, dst: Path) -> None:
    """After a crash between a cross-filesystem copy and its unlink: remove the source if ``dst`` is its copy."""
    _part_name(dst).unlink(missing_ok=True)
    try:
        a, b = os.lstat(src), os.lstat(dst)
    except FileNotFoundError:
        return
    if a.st_dev == b.st_dev or not (stat.S_ISREG(a.st_mode) and stat.S_ISREG(b.st_mode)):
        return  # a rename on one filesystem leaves no source behind: this one is a new drop
    if (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns) or not _same_bytes(src, dst):
        return
    os.unlink(src)
    _fsync_dir(src.parent)


def _same_bytes(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


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
