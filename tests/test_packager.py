"""packager: real sources, real staging zips read back with zipfile, a real full disk where the sandbox allows."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from retrain_uploader.checks import InputError
from retrain_uploader.packager import (
    Package,
    clean_staging,
    package_csv,
    package_pair,
    package_zip,
    sha256_file,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def table(rows: int, cols: int = 3, seed: int = 0) -> bytes:
    rnd = random.Random(seed)
    header = ",".join(f"c{i}" for i in range(cols)) + "\n"
    body = "".join(",".join(str(rnd.random()) for _ in range(cols)) + "\n" for _ in range(rows))
    return (header + body).encode()


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


@pytest.fixture
def pair(inbox: Path) -> Callable[..., tuple[Path, Path]]:
    def make(train: bytes, eval_: bytes, name: str = "sales") -> tuple[Path, Path]:
        t, e = inbox / f"{name}.train.csv", inbox / f"{name}.eval.csv"
        t.write_bytes(train)
        e.write_bytes(eval_)
        return t, e

    return make


# -- single files ------------------------------------------------------------------------------------------------


def test_package_csv_is_the_source_itself(inbox: Path) -> None:
    data = table(10)
    path = inbox / "売上.csv"
    path.write_bytes(data)
    assert package_csv(path) == Package(path=path, upload_filename="売上.csv", size_bytes=len(data),
                                        sha256=sha(data), content_sha256=sha(data), temporary=False,
                                        header=("c0", "c1", "c2"))


def test_package_csv_refuses_bad_input(inbox: Path) -> None:
    path = inbox / "bad.csv"
    path.write_bytes(b"a,b\n1\n")
    with pytest.raises(InputError, match=r"bad.csv: row 2 has 1 column, the header has 2"):
        package_csv(path)


def test_package_zip_is_the_source_itself_and_passes_the_limits(inbox: Path) -> None:
    path = inbox / "model.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train_src/a.csv", table(50))
    data = path.read_bytes()
    assert package_zip(path) == Package(path=path, upload_filename="model.zip", size_bytes=len(data),
                                        sha256=sha(data), content_sha256=sha(data), temporary=False,
                                        header=("c0", "c1", "c2"))
    with pytest.raises(InputError, match=r"zip bomb"):
        package_zip(path, max_ratio=1.0)
    with pytest.raises(InputError, match=r"more than the limit of 10"):
        package_zip(path, max_uncompressed_bytes=10)


def test_sha256_file(inbox: Path) -> None:
    path = inbox / "x.bin"
    path.write_bytes(b"x" * 3_000_001)
    assert sha256_file(path, chunk_size=4096) == sha(b"x" * 3_000_001)
    (inbox / "link").symlink_to(path)
    with pytest.raises(InputError, match=r"symbolic link"):
        sha256_file(inbox / "link")


# -- pairs -------------------------------------------------------------------------------------------------------


def test_pair_round_trip(pair: Callable[..., tuple[Path, Path]], staging: Path) -> None:
    train_data, eval_data = table(200, seed=1), table(20, seed=2)
    train, eval_ = pair(train_data, eval_data)
    before = [os.stat(p) for p in (train, eval_)]
    pkg = package_pair("sales", train, eval_, staging, job_id=42)
    zip_bytes = pkg.path.read_bytes()
    assert pkg == Package(path=staging / "42-sales.zip", upload_filename="sales.zip", size_bytes=len(zip_bytes),
                          sha256=sha(zip_bytes),
                          content_sha256=sha(f"pair\0{sha(train_data)}\0{sha(eval_data)}".encode()),
                          temporary=True, header=("c0", "c1", "c2"))
    with zipfile.ZipFile(pkg.path) as zf:
        assert zf.namelist() == ["train_src/sales.train.csv", "eval_src/sales.eval.csv"]
        assert zf.testzip() is None
        assert zf.read("train_src/sales.train.csv") == train_data
        assert zf.read("eval_src/sales.eval.csv") == eval_data
        for info in zf.infolist():
            assert (info.date_time, info.external_attr >> 16, info.compress_type) == (
                (1980, 1, 1, 0, 0, 0), 0o100644, zipfile.ZIP_DEFLATED)
    assert sorted(p.name for p in staging.iterdir()) == ["42-sales.zip"]
    after = [os.stat(p) for p in (train, eval_)]
    assert [(s.st_mtime_ns, s.st_size, s.st_mode) for s in after] == [
        (s.st_mtime_ns, s.st_size, s.st_mode) for s in before]


def test_pair_with_japanese_names_and_shift_jis(pair: Callable[..., tuple[Path, Path]], staging: Path) -> None:
    train_data = ("店舗,売上\r\n" + "".join(f"東京{i},{i}\r\n" for i in range(100))).encode("cp932")
    eval_data = "店舗,売上\r\n大阪,1\r\n".encode("cp932")
    train, eval_ = pair(train_data, eval_data, name="売上データ")
    pkg = package_pair("売上データ", train, eval_, staging, job_id=1)
    assert (pkg.path.name, pkg.upload_filename) == ("1-売上データ.zip", "売上データ.zip")
    with zipfile.ZipFile(pkg.path) as zf:  # written once, even though the check read them twice
        assert zf.read("train_src/売上データ.train.csv") == train_data
        assert zf.read("eval_src/売上データ.eval.csv") == eval_data


def test_pair_is_deterministic(pair: Callable[..., tuple[Path, Path]], tmp_path: Path) -> None:
    train, eval_ = pair(table(3000, seed=5), table(30, seed=6))
    packages = []
    for job_id, level in ((1, 1), (2, 1), (3, 9)):
        staging = tmp_path / f"staging{job_id}"
        staging.mkdir()
        packages.append(package_pair("sales", train, eval_, staging, job_id=job_id, level=level))
    one, again, tighter = packages
    assert (one.sha256, one.size_bytes) == (again.sha256, again.size_bytes)
    assert one.path.read_bytes() == again.path.read_bytes()
    # Another compression level gives other bytes, but the dedup key only depends on the sources.
    assert tighter.sha256 != one.sha256
    assert one.content_sha256 == again.content_sha256 == tighter.content_sha256


@pytest.mark.parametrize(
    ("train_data", "eval_data", "message"),
    [
        (table(10), b"c0,c1,c2\n1,2\n", r"sales.eval.csv: row 2 has 2 columns, the header has 3"),
        (table(10), table(5, cols=4), r"sales.eval.csv has 4 columns but sales.train.csv has 3"),
        (table(10), b"C0,c1,c2\n1,2,3\n", r"column 1 is 'C0' in sales.eval.csv but 'c0' in sales.train.csv"),
        (b"c0\x00\n1\n", table(5), r"sales.train.csv: contains a NUL byte"),
        (table(10), b"", r"sales.eval.csv: the file is empty"),
    ],
)
def test_bad_pair_leaves_nothing_behind(
    pair: Callable[..., tuple[Path, Path]], staging: Path, train_data: bytes, eval_data: bytes, message: str
) -> None:
    train, eval_ = pair(train_data, eval_data)
    with pytest.raises(InputError, match=message):
        package_pair("sales", train, eval_, staging, job_id=7)
    assert list(staging.iterdir()) == []
    assert (train.read_bytes(), eval_.read_bytes()) == (train_data, eval_data)


def test_missing_or_symlinked_source_leaves_nothing_behind(
    pair: Callable[..., tuple[Path, Path]], staging: Path, inbox: Path
) -> None:
    train, eval_ = pair(table(10), table(2))
    with pytest.raises(FileNotFoundError):
        package_pair("sales", train, inbox / "gone.eval.csv", staging, job_id=1)
    link = inbox / "link.eval.csv"
    link.symlink_to(eval_)
    with pytest.raises(InputError, match=r"link.eval.csv: is a symbolic link"):
        package_pair("sales", train, link, staging, job_id=2)
    assert list(staging.iterdir()) == []


def test_pair_replaces_a_stale_part_file(pair: Callable[..., tuple[Path, Path]], staging: Path) -> None:
    (staging / "3-sales.zip.part").write_bytes(b"left over from a crash")
    pkg = package_pair("sales", *pair(table(10), table(2)), staging, job_id=3)
    assert sorted(p.name for p in staging.iterdir()) == [pkg.path.name]


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "x\0y"])
def test_pair_name_must_be_a_file_name(pair: Callable[..., tuple[Path, Path]], staging: Path, name: str) -> None:
    with pytest.raises(ValueError, match=r"unusable package name"):
        package_pair(name, *pair(table(1), table(1)), staging, job_id=1)


def test_full_disk_propagates_enospc_and_leaves_nothing(
    pair: Callable[..., tuple[Path, Path]], small_disk: Path
) -> None:
    train, eval_ = pair(table(60_000, seed=3), table(10, seed=4))  # ~2.5 MB of digits: > 1 MiB compressed
    with pytest.raises(OSError, match=r"No space left on device") as e:
        package_pair("sales", train, eval_, small_disk, job_id=9)
    assert e.value.errno == errno.ENOSPC
    assert not isinstance(e.value, InputError)
    assert list(small_disk.iterdir()) == []


# -- start-up cleaning -------------------------------------------------------------------------------------------


def test_clean_staging(staging: Path, tmp_path: Path) -> None:
    for name in ("1-a.zip.part", "2-b.zip", "3-c.zip", "4-d.zip", "notes.txt"):
        (staging / name).write_bytes(b"x")
    (staging / "folder.zip").mkdir()
    (staging / "link.zip").symlink_to(staging / "notes.txt")
    via_link = tmp_path / "staging-link"
    via_link.symlink_to(staging)
    keep = [staging / "2-b.zip", via_link / "3-c.zip"]
    removed = clean_staging(staging, keep)
    assert removed == [staging / "1-a.zip.part", staging / "4-d.zip"]
    assert sorted(p.name for p in staging.iterdir()) == ["2-b.zip", "3-c.zip", "folder.zip", "link.zip", "notes.txt"]
    assert clean_staging(tmp_path / "nowhere") == []


def test_clean_staging_removes_an_upper_case_zip_left_by_a_repack(staging: Path) -> None:
    # A macOS zip repacked into staging keeps its dropped name: `7-DATA.ZIP` (found by review round 2).
    for name in ("7-DATA.ZIP", "8-KEEP.ZIP", "9-X.ZIP.PART"):
        (staging / name).write_bytes(b"x")
    assert sorted(p.name for p in clean_staging(staging, [staging / "8-KEEP.ZIP"])) == ["7-DATA.ZIP", "9-X.ZIP.PART"]
    assert sorted(p.name for p in staging.iterdir()) == ["8-KEEP.ZIP"]


def test_clean_staging_with_a_relative_keep_path(staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (staging / "5-e.zip").write_bytes(b"x")
    monkeypatch.chdir(staging.parent)
    assert clean_staging(Path("staging"), [Path("staging/5-e.zip")]) == []
    assert clean_staging(Path("staging")) == [Path("staging/5-e.zip")]


def test_a_one_column_file_is_refused_with_a_hint_about_its_separator(tmp_path: Path) -> None:
    semicolons = tmp_path / "eu.csv"
    semicolons.write_text("a;b;c\n1;2;3\n")
    with pytest.raises(InputError, match=r'separated by semicolons \(";"\), as a European-locale Excel'):
        package_csv(semicolons)
    plain = tmp_path / "one.csv"
    plain.write_text("target\n1\n0\n")
    with pytest.raises(InputError, match="needs a target and at least one feature"):
        package_csv(plain)


def test_a_set_cancel_event_stops_every_kind_of_packaging_and_leaves_nothing(tmp_path: Path) -> None:
    import threading
    import zipfile

    from retrain_uploader.packager import Cancelled

    cancel = threading.Event()
    cancel.set()
    csv_path = tmp_path / "a.csv"
    csv_path.write_bytes(table(50))
    zip_path = tmp_path / "z.zip"
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("train_src/z.csv", table(50))
    train, eval_ = tmp_path / "p.train.csv", tmp_path / "p.eval.csv"
    train.write_bytes(table(50))
    eval_.write_bytes(table(5))
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(Cancelled):
        package_csv(csv_path, cancel=cancel)
    with pytest.raises(Cancelled):
        package_zip(zip_path, cancel=cancel)
    with pytest.raises(Cancelled):
        package_pair("p", train, eval_, staging, job_id=1, cancel=cancel)
    assert list(staging.iterdir()) == []
    cancel.clear()  # not set: the same calls go through
    assert package_zip(zip_path, cancel=cancel).upload_filename == "z.zip"
    assert package_pair("p", train, eval_, staging, job_id=1, cancel=cancel).temporary
