"""Checks of a zip the user dropped: the spec's layout, zip-bomb limits, each CSV member, equal headers."""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .checks import CsvReport, InputError, check_csv_stream, check_same_header, excerpt, open_regular
from .rules import Rules, merge_classes

__all__ = ["ZipReport", "check_zip", "member_name"]

_FOLDERS = ("train_src", "eval_src")
_HOW_TO_ZIP = "the zip may hold only train_src/<training>.csv and, optionally, eval_src/<evaluation>.csv"
_LAYOUT_HINT = (
    "Make the zip again with exactly this layout and nothing else: train_src/<training>.csv and, optionally, "
    "eval_src/<evaluation>.csv (one CSV per folder, no other files or folders, no password). Or drop the CSV "
    "itself, or NAME.train.csv with NAME.eval.csv, and the daemon zips them."
)


@dataclass(frozen=True, slots=True)
class ZipReport:
    size_bytes: int
    sha256: str
    train_member: str
    eval_member: str | None
    train: CsvReport
    eval: CsvReport | None
    junk: tuple[str, ...] = ()  # macOS "Compress" leftovers (__MACOSX/, .DS_Store), dropped when repacked
    warnings: tuple[str, ...] = ()



def check_zip(
    path: Path,
    *,
    max_ratio: float = 200.0,
    max_uncompressed_bytes: int = 64 << 30,
    sink: Callable[[bytes], object] | None = None,
    rules: Rules | None = None,
) -> ZipReport:
    """Check a user-made zip: spec layout, zip-bomb limits, each CSV member, equal headers; hash the zip.

    ``sink`` sees each member's inflated bytes as they are checked (the packager uses it to stop a long check).

    Layout: ``train_src/<one .csv>`` (required), optionally ``eval_src/<one .csv>``, and the two folder
    entries, and nothing else but what macOS "Compress" adds (``__MACOSX/...``, ``.DS_Store``), listed in
    ``junk`` for the packager to repack without them. Sizes are the ones the zip declares; zipfile never
    inflates a member past its declared size. Members are checked first, then the zip's own bytes are hashed
    (a second, sequential read of the compressed file).
    """
    with open_regular(path) as f:
        try:
            with zipfile.ZipFile(f) as zf:
                junk: list[str] = []
                members = _layout(zf, path.name, max_ratio, max_uncompressed_bytes, junk)
                rules = rules or Rules()
                by_folder = {"train_src": rules, "eval_src": rules.for_eval()}
                reports = {
                    folder: _check_member(zf, info, path.name, sink, by_folder[folder])
                    for folder, info in members.items()
                }
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            msg = f"{path.name}: not a valid zip file, or corrupt ({e}); create it again and drop it again"
            raise InputError(msg) from e
        train, eval_ = reports["train_src"], reports.get("eval_src")
        warnings = list(train.warnings)
        if eval_ is not None:
            check_same_header(train, eval_, train_name=_member_name(members["train_src"]),
                              eval_name=_member_name(members["eval_src"]))
            if train.target is not None and eval_.target is not None and rules.target is not None:
                warnings += merge_classes(train.target, eval_.target, rules.target)
        f.seek(0)
        size, digest = _sha256_of(f)
    eval_info = members.get("eval_src")
    return ZipReport(size_bytes=size, sha256=digest, train_member=_member_name(members["train_src"]),
                     eval_member=None if eval_info is None else _member_name(eval_info),
                     train=train, eval=eval_, junk=tuple(junk), warnings=tuple(warnings))


def _sha256_of(f: IO[bytes], chunk_size: int = 1 << 20) -> tuple[int, str]:
    hasher, size = hashlib.sha256(), 0
    while chunk := f.read(chunk_size):
        hasher.update(chunk)
        size += len(chunk)
    return size, hasher.hexdigest()


def _is_macos_junk(parts: list[str]) -> bool:
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store"


def _layout(
    zf: zipfile.ZipFile, name: str, max_ratio: float, max_total: int, junk: list[str]
) -> dict[str, zipfile.ZipInfo]:
    found: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in zf.infolist():
        member = _member_name(info)
        parts = member.split("/")
        if "\\" in member or member.startswith("/") or ".." in parts or member[1:2] == ":":
            msg = f"{name}: entry {excerpt(member)} has an unsafe path (absolute, .. or \\); {_HOW_TO_ZIP}"
            raise InputError(msg, hint=_LAYOUT_HINT)
        if _is_macos_junk(parts):
            junk.append(member)  # never read: resource forks and Finder settings, not data
            continue
        if info.is_dir() and len(parts) == 2 and parts[0] in _FOLDERS and not parts[1]:
            continue
        is_csv = len(parts) == 2 and parts[0] in _FOLDERS and parts[1].lower().endswith(".csv")
        if info.is_dir() or not is_csv:
            raise InputError(f"{name}: unexpected entry {excerpt(member)}; {_HOW_TO_ZIP}", hint=_LAYOUT_HINT)
        if parts[0] in found:
            msg = (f"{name}: more than one CSV in {parts[0]}/ ({excerpt(_member_name(found[parts[0]]))}, "
                   f"{excerpt(member)}); keep exactly one CSV per folder")
            raise InputError(msg, hint=_LAYOUT_HINT)
        if info.flag_bits & 0x1:
            msg = f"{name}: entry {excerpt(member)} is encrypted; create the zip without a password"
            raise InputError(msg, hint=_LAYOUT_HINT)
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > max_ratio:
            msg = (f"{name}: entry {excerpt(member)} expands {ratio:.0f} times (limit {max_ratio:g}), "
                   "refused as a possible zip bomb; upload the CSV itself instead of a zip")
            raise InputError(msg, hint="Drop the CSV itself instead of a zip; the daemon zips it.")
        total += info.file_size
        found[parts[0]] = info
    if total > max_total:
        msg = (f"{name}: the CSVs inside expand to {total} bytes, more than the limit of {max_total}; "
               "split the data or raise the limit")
        hint = "Split the data into smaller files, or raise [packaging] max_uncompressed_bytes in the config."
        raise InputError(msg, hint=hint)
    if "train_src" not in found:
        raise InputError(f"{name}: no train_src/<file>.csv entry; {_HOW_TO_ZIP}", hint=_LAYOUT_HINT)
    return found


def member_name(info: zipfile.ZipInfo) -> str:
    return _member_name(info)


def _member_name(info: zipfile.ZipInfo) -> str:
    """Entry name as typed: without the UTF-8 flag zipfile reads cp437, but such names are UTF-8 or cp932."""
    if info.flag_bits & 0x800 or info.filename.isascii():
        return info.filename
    raw = info.filename.encode("cp437")
    for encoding in ("utf-8", "cp932"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            pass
    return info.filename


def _check_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, sink: Callable[[bytes], object] | None, rules: Rules
) -> CsvReport:
    member = f"{name}:{_member_name(info)}"
    try:
        with zf.open(info) as raw:
            return check_csv_stream(raw, name=member, sink=sink, rules=rules)
    except (NotImplementedError, RuntimeError) as e:  # unsupported compression method, password needed
        msg = f"{member}: cannot be read ({e}); create the zip again with normal (deflate) compression"
        hint = "Make the zip again with normal (deflate) compression and no password, then drop it again."
        raise InputError(msg, hint=hint) from e
