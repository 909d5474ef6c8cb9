from hypothesis import given
from hypothesis import strategies as st

from retrain_uploader.watcher import Candidate, SettleTracker, is_ignored, plan


def test_single_csv_pair_and_zip() -> None:
    result = plan(["a.csv", "b.train.csv", "b.eval.csv", "c.zip"])
    assert result.candidates == (
        Candidate("csv", "a", ("a.csv",), "a.csv"),
        Candidate("pair", "b", ("b.train.csv", "b.eval.csv"), "b.zip"),
        Candidate("zip", "c", ("c.zip",), "c.zip"),
    )
    assert result.halves == ()
    assert result.rejects == ()


def test_half_a_pair_waits() -> None:
    result = plan(["x.train.csv", "y.eval.csv"])
    assert result.candidates == ()
    assert result.halves == ("x.train.csv", "y.eval.csv")


def test_ignored_names_are_not_candidates() -> None:
    names = [".hidden.csv", "a.csv.tmp", "a.csv.part", "b.partial", "c.crdownload", "d.csv.swp", "e.csv~"]
    assert all(is_ignored(n) for n in names)
    assert plan(names).candidates == ()
    assert plan(names).rejects == ()


def test_unsupported_and_hostile_names_are_rejected_with_a_reason() -> None:
    long_name = "あ" * 80 + ".csv"  # 240 bytes of UTF-8
    result = plan(["notes.txt", "bad\nname.csv", long_name])
    reasons = {r.name: r.reason for r in result.rejects}
    assert set(reasons) == {"notes.txt", "bad\nname.csv", long_name}
    assert "supported" in reasons["notes.txt"]
    assert "control characters" in reasons["bad\nname.csv"]
    assert "longer than" in reasons[long_name]


def test_japanese_and_odd_but_printable_names_are_fine() -> None:
    result = plan(["売上 2026+11&#.csv"])
    assert result.candidates == (Candidate("csv", "売上 2026+11&#", ("売上 2026+11&#.csv",), "売上 2026+11&#.csv"),)


stems = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1,
                max_size=12).filter(lambda s: not s.startswith(".") and "/" not in s and "\x00" not in s)


@given(st.lists(st.tuples(stems, st.sampled_from([".csv", ".train.csv", ".eval.csv", ".zip"])), max_size=20),
       st.randoms())
def test_plan_is_order_independent_and_each_file_is_used_at_most_once(items: list[tuple[str, str]], rnd) -> None:
    names = [stem + suffix for stem, suffix in items]
    shuffled = list(names)
    rnd.shuffle(shuffled)
    a, b = plan(names), plan(shuffled)
    assert a == b
    used = [src for c in a.candidates for src in c.sources] + list(a.halves) + [r.name for r in a.rejects]
    assert len(used) == len(set(used))
    assert set(used) <= set(names)
    for c in a.candidates:
        if c.kind == "pair":
            assert c.sources[0].lower().endswith(".train.csv") and c.sources[1].lower().endswith(".eval.csv")
            assert c.upload_filename == c.name + ".zip"


def test_settle_tracker_uses_its_own_clock_and_restarts_on_change() -> None:
    t = SettleTracker(settle_s=5)
    sig1 = (10, 1, 1, 1, 1)
    assert t.observe({"a.csv": sig1}, now=100.0) == set()
    assert t.next_due(100.0) == 5.0
    assert t.observe({"a.csv": sig1}, now=104.9) == set()
    # The copy goes on: size grows (an old preserved mtime does not matter, ctime and size do).
    sig2 = (20, 1, 2, 1, 1)
    assert t.observe({"a.csv": sig2}, now=105.0) == set()
    assert t.observe({"a.csv": sig2}, now=109.99) == set()
    assert t.observe({"a.csv": sig2}, now=110.0) == {"a.csv"}
    assert t.next_due(110.0) is None
    # A file that vanished is forgotten; when it comes back it settles afresh.
    assert t.observe({}, now=111.0) == set()
    assert t.observe({"a.csv": sig2}, now=112.0) == set()


@given(st.lists(st.floats(0, 100), min_size=1, max_size=30), st.floats(0.1, 10))
def test_settled_only_after_a_quiet_period(times: list[float], settle: float) -> None:
    t = SettleTracker(settle_s=settle)
    times = sorted(times)
    last_change = times[0]
    for i, now in enumerate(times):
        sig = (i, 0, 0, 0, 0) if i % 3 == 0 else ((i // 3) * 3, 0, 0, 0, 0)
        if i % 3 == 0:
            last_change = now
        settled = t.observe({"f": sig}, now)
        assert ("f" in settled) == (now - last_change >= settle)


def test_a_file_that_settled_after_the_scan_is_due_at_once_not_at_the_rescan() -> None:
    # The scan saw it unsettled; the loop was held up past settle_s before asking when to scan again. "Every file is
    # settled" (None) sent the watcher to sleep until the periodic rescan, a minute, with the file never offered.
    t = SettleTracker(settle_s=0.05)
    assert t.observe({"a.csv": (10, 1, 1, 1, 1)}, now=100.0) == set()
    assert t.next_due(100.2) == 0.0  # scan again now: it is settled
    assert t.observe({"a.csv": (10, 1, 1, 1, 1)}, now=100.2) == {"a.csv"}
    assert t.next_due(100.2) is None  # offered by that scan: nothing left to wait for
    # A file the last scan found settled (a half waiting for its partner) never makes the watcher scan in a loop.
    assert t.next_due(500.0) is None
