"""A model's rules (target, task, columns / header_file, max_empty_target_ratio), checked in the one read of a file."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from retrain_uploader.checks import InputError, check_csv
from retrain_uploader.config import ConfigError, ModelSettings, Settings
from retrain_uploader.ledger import Ledger, State
from retrain_uploader.packager import package_pair, package_zip
from retrain_uploader.rules import Rules, model_rules


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def rows(target_values: list[str], header: str = "x,y,label") -> str:
    return header + "\n" + "".join(f"{i},{i * 2},{v}\n" for i, v in enumerate(target_values))


def test_no_rules_changes_nothing(tmp_path: Path) -> None:
    report = check_csv(write(tmp_path, "a.csv", rows(["a"] * 5)), rules=Rules())
    assert (report.warnings, report.target) == ((), None)


def test_missing_target_is_refused_naming_the_column_and_the_header(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"a.csv: has no target column 'churn' .* its header is 'x', 'y', 'label'"):
        check_csv(write(tmp_path, "a.csv", rows(["a", "b"])), rules=Rules(target="churn"))


@pytest.mark.parametrize("chunk_size", [7, 1 << 20])  # fast path and csv-module path give the same verdicts
def test_binary_needs_exactly_two_classes_in_the_first_1000_rows(tmp_path: Path, chunk_size: int) -> None:
    rules = Rules(target="label", task="binary")
    ok = check_csv(write(tmp_path, "ok.csv", rows(["yes", "no"] * 600)), rules=rules, chunk_size=chunk_size)
    assert ok.target is not None and ok.target.first_classes == {"yes", "no"}
    # a third value after row 1000 does not count (Prediction One looks at the first 1000 only)
    late = rows(["yes", "no"] * 500 + ["maybe"])
    assert check_csv(write(tmp_path, "late.csv", late), rules=rules, chunk_size=chunk_size).rows == 1001
    with pytest.raises(InputError, match=r"binary but target 'label' has 1 distinct value"):
        check_csv(write(tmp_path, "one.csv", rows(["yes"] * 10)), rules=rules, chunk_size=chunk_size)
    with pytest.raises(InputError, match=r"binary but target 'label' has 3 distinct value"):
        check_csv(write(tmp_path, "three.csv", rows(["a", "b", "c"])), rules=rules, chunk_size=chunk_size)


def test_multiclass_needs_three_classes_up_front_and_at_most_200(tmp_path: Path) -> None:
    rules = Rules(target="label", task="multiclass")
    assert check_csv(write(tmp_path, "ok.csv", rows(["a", "b", "c"] * 3)), rules=rules).rows == 9
    with pytest.raises(InputError, match=r"multiclass but target 'label' has 2 distinct value"):
        check_csv(write(tmp_path, "two.csv", rows(["a", "b"] * 3)), rules=rules)
    with pytest.raises(InputError, match=r"more than 200 distinct values"):
        check_csv(write(tmp_path, "many.csv", rows([f"c{i}" for i in range(201)])), rules=rules)


def test_regression_target_must_be_numeric(tmp_path: Path) -> None:
    rules = Rules(target="label", task="regression")
    assert check_csv(write(tmp_path, "ok.csv", rows(["1", "-2.5", "3e4", " 7 ", ".5"])), rules=rules).rows == 5
    with pytest.raises(InputError, match=r"regression but target 'label' is not a number in row 4 \('12 kg'\)"):
        check_csv(write(tmp_path, "kg.csv", rows(["1", "2", "12 kg", "4"])), rules=rules)


def test_quoted_values_are_read_like_csv(tmp_path: Path) -> None:
    rules = Rules(target="label", task="binary")
    text = 'x,y,label\n"1,5",2,"yes"\n"a\nb",3,no\n'
    report = check_csv(write(tmp_path, "q.csv", text), rules=rules)
    assert report.target is not None and report.target.first_classes == {"yes", "no"}


def test_empty_targets_warn_then_refuse_above_the_ratio(tmp_path: Path) -> None:
    rules = Rules(target="label", task="binary", max_empty_target_ratio=0.5)
    report = check_csv(write(tmp_path, "some.csv", rows(["a", "b", "", "a"])), rules=rules)
    assert report.warnings == ("target 'label' is empty in 1 of 4 data rows (25%)",)
    with pytest.raises(InputError, match=r"empty in 3 of 5 data rows \(60%\), more than max_empty_target_ratio 0.5"):
        check_csv(write(tmp_path, "most.csv", rows(["a", "b", "", "", ""])), rules=rules)


def test_columns_no_missing_same_and_any(tmp_path: Path) -> None:
    ref = ("x", "y", "label")
    path = write(tmp_path, "new.csv", "x,y,label,extra\n1,2,a,e\n3,4,b,f\n")
    report = check_csv(path, rules=Rules(reference=ref, reference_from="job 3"))
    assert report.warnings == ("new column(s) 'extra' not in the model's reference header (job 3)",)
    with pytest.raises(InputError, match=r"'extra' are not in the model's reference header"):
        check_csv(path, rules=Rules(reference=ref, columns="same"))
    renamed = write(tmp_path, "renamed.csv", rows(["a", "b"], header="x,why,label"))
    with pytest.raises(InputError, match=r"column\(s\) 'y' of the model's reference header .* missing or renamed"):
        check_csv(renamed, rules=Rules(reference=ref))
    assert check_csv(renamed, rules=Rules(reference=ref, columns="any")).warnings == ()


def model(tmp_path: Path, **keys: object) -> ModelSettings:
    return ModelSettings.model_validate({"name": "m", "inbox": tmp_path / "in", "api_key_env": "K", **keys})


def test_reference_is_header_file_else_the_last_finished_job(tmp_path: Path) -> None:
    header_file = write(tmp_path, "ref.tsv", "x\ty\tlabel\n")
    rules = model_rules(model(tmp_path, header_file=header_file), (7, ("other",)))
    assert (rules.reference, rules.reference_from) == (("x", "y", "label"), f"header_file {header_file}")
    with Ledger(tmp_path / "l.sqlite3") as ledger:
        assert ledger.reference_header("m", None) is None  # the first upload has no reference and passes
        for state, header in ((State.FINISHED, ("a", "b")), (State.SWITCHED, ("a", "b", "c")),
                              (State.RETRAIN_FAILED, ("z",))):
            job = ledger.create_job(model="m", kind="csv", name="n", sources=["n.csv"], upload_filename="n.csv")
            ledger.update(job.id, state=state, header=header)
        assert ledger.reference_header("m", None) == (2, ("a", "b", "c"))
    rules = model_rules(model(tmp_path), (2, ("a", "b", "c")))
    assert rules.reference == ("a", "b", "c") and "job 2" in rules.reference_from


def test_config_keys_and_task_needs_target(tmp_path: Path) -> None:
    base = {"name": "m", "inbox": str(tmp_path / "in"), "api_key_env": "K"}
    settings = Settings.from_mapping({"models": [{**base, "target": "y", "task": "regression", "columns": "same",
                                                  "header_file": "ref.csv", "max_empty_target_ratio": 0.1}]},
                                     source=tmp_path / "c.toml")
    assert settings.models[0].header_file == tmp_path / "ref.csv"  # relative to the config file
    with pytest.raises(ConfigError, match=r"task needs target"):
        Settings.from_mapping({"models": [{**base, "task": "binary"}]})
    with pytest.raises(ConfigError, match=r"models\[0\] \(m\)\.task"):
        Settings.from_mapping({"models": [{**base, "target": "y", "task": "clustering"}]})


def test_pair_target_in_eval_and_eval_classes_outside_train_warn(tmp_path: Path) -> None:
    rules = Rules(target="label", task="binary")
    train = write(tmp_path, "s.train.csv", rows(["a", "b"] * 3))
    eval_ = write(tmp_path, "s.eval.csv", rows(["a", "c"]))
    staging = tmp_path / "staging"
    staging.mkdir()
    pkg = package_pair("s", train, eval_, staging, job_id=1, rules=rules)
    assert pkg.warnings == ("evaluation target 'label' has class(es) not in the training data: 'c'",)
    no_target = write(tmp_path, "t.eval.csv", rows(["a"], header="x,y,lbl"))
    with pytest.raises(InputError):
        package_pair("t", train, no_target, staging, job_id=2, rules=rules)


def test_macos_zip_is_repacked_without_its_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "m.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("train_src/", b"")
        zf.writestr("train_src/a.csv", rows(["a", "b"]))
        zf.writestr("train_src/.DS_Store", b"\0\0\0\1Bud1")
        zf.writestr("__MACOSX/", b"")
        zf.writestr("__MACOSX/train_src/._a.csv", b"\0\5\26\7 resource fork")
    staging = tmp_path / "staging"
    staging.mkdir()
    before = path.read_bytes()
    pkg = package_zip(path, staging_dir=staging, job_id=9)
    assert pkg.removed_entries == ("train_src/.DS_Store", "__MACOSX/", "__MACOSX/train_src/._a.csv")
    assert (pkg.path, pkg.upload_filename, pkg.temporary) == (staging / "9-m.zip", "m.zip", True)
    with zipfile.ZipFile(pkg.path) as zf:
        assert zf.namelist() == ["train_src/a.csv"]
        assert zf.read("train_src/a.csv").decode() == rows(["a", "b"])
    assert path.read_bytes() == before  # the source is only read


@pytest.mark.parametrize(("rules", "values", "rule", "key"), [
    (Rules(target="churn"), ["a", "b"], "target = 'churn'", "`target`"),
    (Rules(target="label", task="binary"), ["a", "b", "c"], 'task = "binary"', "`task`"),
    (Rules(target="label", task="multiclass"), ["a", "b"], 'task = "multiclass"', "`task`"),
    (Rules(target="label", task="multiclass"), [str(i) for i in range(201)] * 2, 'task = "multiclass"', "`task`"),
    (Rules(target="label", task="regression"), ["1", "2 kg"], 'task = "regression"', "`task`"),
    (Rules(target="label", max_empty_target_ratio=0.2), ["1", "", ""], "max_empty_target_ratio = 0.2",
     "`max_empty_target_ratio`"),
    (Rules(reference=("x", "y", "label", "z")), ["1"], 'columns = "no_missing"', "`columns` (or `header_file`)"),
    (Rules(reference=("x", "label"), columns="same"), ["1"], 'columns = "same"', "`columns` (or `header_file`)"),
], ids=["target", "binary", "multiclass-few", "multiclass-many", "regression", "empty", "no_missing", "same"])
def test_a_rule_refusal_says_which_rule_and_which_config_key(
    tmp_path: Path, rules: Rules, values: list[str], rule: str, key: str
) -> None:
    with pytest.raises(InputError) as caught:
        check_csv(write(tmp_path, "a.csv", rows(values)), rules=rules)
    hint = caught.value.hint
    assert hint is not None
    assert hint.startswith(f"The file breaks the model's rule {rule} (its [[models]] entry in the config). ")
    assert f"change {key} in the config" in hint
