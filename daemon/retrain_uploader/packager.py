"""Packaging: turn a dropped input into the exact file to PUT, checked and hashed.

A single CSV or a user-made zip is uploaded as it is. A train/eval pair is written into a staging zip in the
spec layout, in the same pass that checks and hashes each source. Synchronous: run it in a worker thread.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import os
import sys
import threading
import zipfile
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO

from .checks import CsvReport, InputError, check_csv, check_csv_stream, check_same_header, open_regular
from .rules import Rules, merge_classes
from .zipcheck import check_zip, member_name

__all__ = [
    "Cancelled",
    "Package",
    "check_sent_csv",
    "clean_staging",
    "hash_csv",
    "moved_intact",
    "package_csv",
    "package_pair",
    "package_zip",
    "sha256_file",
    "source_identities",
    "source_identity",
]

_ASCII = bytes(range(0x80))
_EPOCH = (1980, 1, 1, 0, 0, 0)  # fixed member timestamps, so equal content gives an equal zip
_MEMBER_ATTR = 0o100644 << 16  # regular file, rw-r--r--
_UNIX = 3  # ZipInfo.create_system


@dataclass(frozen=True, slots=True)
class Package:
    path: Path  # the file to PUT: the source itself for a csv or zip, a staging zip for a pair
    upload_filename: str  # "NAME.csv" | "NAME.zip"
    size_bytes: int
    sha256: str  # of the exact bytes at `path`
    content_sha256: str  # dedup key: sha256 for csv/zip; for a pair derived from the two sources' sha256
    temporary: bool  # True when `path` is a staging file the daemon owns and may delete
    header: tuple[str, ...] | None = None  # the training data's header (the next reference for `columns`)
    warnings: tuple[str, ...] = ()  # from the model's rules
    removed_entries: tuple[str, ...] = ()  # macOS leftovers a user zip was repacked without
    checked: bool = True  # False: only hashed so far; the bytes are checked while they are sent (hash_csv)


class Cancelled(Exception):
    """Packaging was stopped (the daemon is shutting down); nothing was kept, the job is packaged again later."""


def source_identity(path: Path) -> list[int]:
    """``[device, inode, size, mtime_ns, ctime_ns]`` of the entry at ``path`` (lstat: a link in its place is another
    file); ``[]`` if there is none. A job moves out of the inbox only files that still have the identity it checked.
    The ctime catches a rewrite in place that kept the size and put the mtime back (``cp -p``, ``rsync --inplace -t``).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return []
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def moved_intact(recorded: list[int], now: list[int]) -> bool:
    """Is ``now`` (the identity at a move's target) the file that had identity ``recorded`` in the inbox?

    A rename changes the ctime; a move onto another filesystem (a copy, mtime kept) changes device and inode too.
    """
    if not now or len(recorded) < 4:
        return False
    if now[0] == recorded[0]:
        return now[1:4] == recorded[1:4]
    return now[2:4] == recorded[2:4]


def source_identities(inbox: Path, names: Collection[str]) -> dict[str, list[int]]:
    return {name: source_identity(inbox / name) for name in names}


def _watching(cancel: threading.Event | None, sink: Callable[[bytes], object] | None = None) -> Callable[[bytes], None]:
    """A sink that stops the pass at the next chunk once ``cancel`` is set (the thread cannot be interrupted)."""

    def step(chunk: bytes) -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled
        if sink is not None:
            sink(chunk)

    return step


def package_csv(path: Path, *, cancel: threading.Event | None = None, rules: Rules | None = None) -> Package:
    """Check and hash a dropped CSV (one read); it is uploaded unchanged under its own name."""
    report = check_csv(path, sink=_watching(cancel) if cancel is not None else None, rules=rules)
    _trainable(report, path.name)
    return Package(path=path, upload_filename=path.name, size_bytes=report.size_bytes, sha256=report.sha256,
                   content_sha256=report.sha256, temporary=False, header=report.header, warnings=report.warnings)


def hash_csv(path: Path, *, cancel: threading.Event | None = None) -> Package | None:
    """Hash a dropped CSV (sha256 runs at GB/s), so a duplicate is found before any API call; its check runs later,
    on the bytes as they are sent (:func:`check_sent_csv`), and the PUT's last byte waits for it.

    None when the file is not UTF-8: its check would have to read it a second time (as cp932) while the PUT holds its
    last byte, long enough to look like a stalled upload; such a file is checked in full before its upload instead.
    This screen only routes: it decodes the file's non-ASCII bytes run together (about a tenth of a Japanese export),
    which every UTF-8 file passes and a cp932 one practically never does. The rare non-UTF-8 file that passes (a
    sequence cut short by an ASCII byte and finished after it) is still judged exactly by the streamed check.
    """
    hasher, size = hashlib.sha256(), 0
    step = _watching(cancel, hasher.update)
    utf8 = codecs.getincrementaldecoder("utf-8")()
    # sha256 lets go of the GIL: a chunk is hashed in a second thread while this one screens it (no upload runs yet).
    with open_regular(path) as f, ThreadPoolExecutor(1, thread_name_prefix="hash_csv") as hashing:
        while chunk := f.read(1 << 20):
            hashed = hashing.submit(step, chunk)
            size += len(chunk)
            try:
                if not chunk.isascii():
                    utf8.decode(chunk.translate(None, _ASCII))
            except UnicodeDecodeError:
                return None
            finally:
                hashed.result()
    try:
        utf8.decode(b"", final=True)
    except UnicodeDecodeError:
        return None
    sha256 = hasher.hexdigest()
    return Package(path=path, upload_filename=path.name, size_bytes=size, sha256=sha256, content_sha256=sha256,
                   temporary=False, checked=False)


def check_sent_csv(raw: IO[bytes], *, name: str, rules: Rules | None = None) -> CsvReport:
    """The checks :func:`package_csv` runs, on the bytes read from ``raw`` (a PUT's body, as it is sent)."""
    report = check_csv_stream(raw, name=name, rules=rules, hashed=False)  # the PUT hashes what it sends
    _trainable(report, name)
    return report


def package_zip(
    path: Path,
    *,
    max_ratio: float = 200.0,
    max_uncompressed_bytes: int = 64 << 30,
    cancel: threading.Event | None = None,
    rules: Rules | None = None,
    staging_dir: Path | None = None,
    job_id: int = 0,
    level: int = 1,
) -> Package:
    """Check a dropped zip (layout, zip-bomb limits, each CSV inside) and hash it; uploaded unchanged, unless macOS
    "Compress" left ``__MACOSX/`` or ``.DS_Store`` entries in it: then it is repacked without them into
    ``staging_dir/{job_id}-{name}`` (same member names and bytes) and that copy is uploaded under the zip's name."""
    report = check_zip(
        path,
        max_ratio=max_ratio,
        max_uncompressed_bytes=max_uncompressed_bytes,
        sink=_watching(cancel) if cancel is not None else None,
        rules=rules,
    )
    _trainable(report.train, f"{path.name}:{report.train_member}")
    common = {"header": report.train.header, "warnings": report.warnings, "upload_filename": path.name}
    if not report.junk:
        return Package(path=path, size_bytes=report.size_bytes, sha256=report.sha256,
                       content_sha256=report.sha256, temporary=False, **common)  # type: ignore[arg-type]
    if staging_dir is None:
        raise ValueError("a zip with macOS leftovers needs a staging_dir to be repacked in")
    final = staging_dir / f"{job_id}-{path.name}"
    with _staged(final) as out, zipfile.ZipFile(out, "w") as zf, open_regular(path) as f, zipfile.ZipFile(f) as src:
        for info in src.infolist():
            name = member_name(info)
            if info.is_dir() or name.split("/")[0] == "__MACOSX" or name.split("/")[-1] == ".DS_Store":
                continue
            with src.open(info) as raw:
                _write_member(zf, name, raw, info.file_size, level, cancel)
    size, sha256 = _hash(final)
    return Package(path=final, size_bytes=size, sha256=sha256, content_sha256=sha256, temporary=True,
                   removed_entries=report.junk, **common)  # type: ignore[arg-type]


def _trainable(report: CsvReport, name: str) -> None:
    """Training needs a target and at least one feature. A single column is most often a file separated by something
    else (";" from a European-locale Excel): refused here rather than sent to a useless, paid retraining."""
    if report.columns >= 2:
        return
    other = next((sep for sep in (";", "|") if sep in report.header[0]), None)
    hint = f" (it looks separated by {other!r})" if other else ""
    msg = (f"{name}: the header has only one column{hint}; training needs a target and at least one feature. "
           "Save it comma- or tab-separated and drop it again")
    raise InputError(msg)


def package_pair(
    name: str, train: Path, eval_: Path, staging_dir: Path, *, job_id: int, level: int = 1,
    cancel: threading.Event | None = None, rules: Rules | None = None,
) -> Package:
    """Write ``staging_dir/{job_id}-{name}.zip`` holding ``train_src/{train.name}`` and ``eval_src/{eval_.name}``.

    Each source is checked and hashed in the pass that compresses it (ZIP_DEFLATED at ``level``). The bytes
    are deterministic (fixed timestamps, permissions and order), so equal sources give an equal zip. The zip
    is written as ``*.part``, fsynced, renamed into place and the directory fsynced. On any error the partial
    file is removed and the error re-raised: InputError for bad input, OSError (e.g. ENOSPC) unchanged.
    Sources are only read. ``content_sha256`` depends only on the two sources' bytes, not on the zip's.
    """
    if not name or "/" in name or "\0" in name or name in {".", ".."}:
        raise ValueError(f"unusable package name {name!r}")
    final = staging_dir / f"{job_id}-{name}.zip"
    part = final.with_name(final.name + ".part")
    placed = False
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out:
            with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
                rules = rules or Rules()
                train_report = _add_member(zf, f"train_src/{train.name}", train, level, cancel, rules)
                eval_report = _add_member(zf, f"eval_src/{eval_.name}", eval_, level, cancel, rules.for_eval())
            check_same_header(train_report, eval_report, train_name=train.name, eval_name=eval_.name)
            _trainable(train_report, train.name)
            out.flush()
            os.fsync(out.fileno())
        size, sha256 = _hash(part)
        os.replace(part, final)
        placed = True
        _fsync_dir(staging_dir)
    except BaseException:
        for path in (part, final) if placed else (part,):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise
    content = hashlib.sha256(b"pair\0" + train_report.sha256.encode() + b"\0" + eval_report.sha256.encode())
    warnings = list(train_report.warnings)
    if rules.target is not None and train_report.target is not None and eval_report.target is not None:
        warnings += merge_classes(train_report.target, eval_report.target, rules.target)
    return Package(path=final, upload_filename=f"{name}.zip", size_bytes=size, sha256=sha256,
                   header=train_report.header, warnings=tuple(warnings),
                   content_sha256=content.hexdigest(), temporary=True)


@contextlib.contextmanager
def _staged(final: Path) -> Iterator[BinaryIO]:
    """Write ``final`` as ``final.part``, fsync it, rename it into place; on any error remove what was written."""
    part = final.with_name(final.name + ".part")
    placed = False
    try:
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with open(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, final)
        placed = True
        _fsync_dir(final.parent)
    except BaseException:
        for path in (part, final) if placed else (part,):
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise


def _member_info(arcname: str, size: int, level: int) -> zipfile.ZipInfo:
    """A member of a zip we write: fixed time and mode (equal content, equal zip), deflated at ``level``."""
    info = zipfile.ZipInfo(arcname, date_time=_EPOCH)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = _MEMBER_ATTR
    info.create_system = _UNIX
    info.file_size = size  # the member's real size: lets zipfile choose zip64 up front for big files
    # ZipFile.open(ZipInfo, "w") takes the level from the ZipInfo; the field is public only from 3.13.
    setattr(info, "compress_level" if sys.version_info >= (3, 13) else "_compresslevel", level)
    return info


def _write_member(
    zf: zipfile.ZipFile, arcname: str, raw: IO[bytes], size: int, level: int, cancel: threading.Event | None
) -> None:
    with zf.open(_member_info(arcname, size, level), "w") as member:
        step = _watching(cancel, member.write)
        while chunk := raw.read(1 << 20):
            step(chunk)


def _add_member(
    zf: zipfile.ZipFile, arcname: str, source: Path, level: int, cancel: threading.Event | None, rules: Rules
) -> CsvReport:
    with open_regular(source) as raw:
        info = _member_info(arcname, os.fstat(raw.fileno()).st_size, level)
        with zf.open(info, "w") as member:
            return check_csv_stream(raw, name=source.name, sink=_watching(cancel, member.write), rules=rules)


def _hash(path: Path, chunk_size: int = 1 << 20) -> tuple[int, str]:
    hasher, size = hashlib.sha256(), 0
    with open_regular(path) as f:
        while chunk := f.read(chunk_size):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """sha256 of the file at ``path``, streamed, opened with open_regular (no symlinks, no FIFOs)."""
    return _hash(path, chunk_size)[1]


def clean_staging(staging_dir: Path, keep: Collection[Path] = ()) -> list[Path]:
    """At start-up: delete ``*.part`` files and the ``*.zip`` files not in ``keep``; return what was removed.

    Only regular files directly in ``staging_dir`` are touched (symlinks and folders are left alone); paths
    are compared after resolving, so ``keep`` may name them relatively or through a symlinked folder.
    A missing ``staging_dir`` has nothing to clean.
    """
    kept = {Path(p).resolve() for p in keep}
    try:
        entries = list(os.scandir(staging_dir))
    except FileNotFoundError:
        return []
    real_dir = staging_dir.resolve()
    removed = []
    for entry in entries:
        # Case-insensitive: a macOS zip repacked here keeps its dropped name (`7-DATA.ZIP`).
        lower = entry.name.lower()
        if not lower.endswith((".part", ".zip")) or not entry.is_file(follow_symlinks=False):
            continue
        if lower.endswith(".zip") and real_dir / entry.name in kept:
            continue
        path = staging_dir / entry.name
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return sorted(removed)
