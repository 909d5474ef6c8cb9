"""A model's own rules for its training data (``target``, ``task``, ``columns``), checked in the single read of a CSV.

From Prediction One's data format: the task is decided from the target column's first 1000 data rows (binary: exactly
2 distinct values there, multiclass: 3 or more, at most 200 classes); a regression target is numeric; a missing value
is an empty string. :class:`Rules` is built once per file from the model's settings and its reference header;
``checks`` feeds it the target column in batches (:meth:`Rules.feed`) and asks for the verdict at the end.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .config import ModelSettings

__all__ = [
    "FIRST_ROWS",
    "MAX_CLASSES",
    "RuleError",
    "Rules",
    "TargetStats",
    "compare_columns",
    "merge_classes",
    "model_rules",
    "read_header_file",
]

FIRST_ROWS = 1000  # Prediction One decides the task from the target's first 1000 data rows
MAX_CLASSES = 200
_NUMBER = r"[ \t]*[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?[ \t]*"
# Every value in a batch joined by "\n", empty or numeric: one C-level match per batch, not one float() per value.
# Possessive (3.11+): the grammar never needs to give back characters, and backtracking points cost 7x here.
_NUMBER_POSSESSIVE = r"[ \t]*+[+-]?+(?:\d++(?:\.\d*+)?+|\.\d++)(?:[eE][+-]?+\d++)?+[ \t]*+"
_NUMBERS = re.compile(rf"(?:{_NUMBER_POSSESSIVE})?+(?:\n(?:{_NUMBER_POSSESSIVE})?+)*+")
_ONE_NUMBER = re.compile(_NUMBER)
_NUMBERS_B = re.compile(_NUMBERS.pattern.encode())
_ONE_NUMBER_B = re.compile(_NUMBER.encode())

Task = Literal["binary", "multiclass", "regression"]
Columns = Literal["no_missing", "same", "any"]


class RuleError(ValueError):
    """The file breaks one of the model's rules (checks turns it into an InputError naming the file).

    ``hint`` is the error file's ``what_to_do``: it names the rule and the config key that set it.
    """

    def __init__(self, message: str, *, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def _rule_hint(rule: str, fix: str, key: str) -> str:
    return (f"The file breaks the model's rule {rule} (its [[models]] entry in the config). {fix}, then drop it "
            f"into the inbox again; or, if the rule is wrong, change {key} in the config, reload the daemon and "
            "drop the file again.")


@dataclass(slots=True)
class TargetStats:
    """What one file's target column held."""

    rows: int = 0
    empty: int = 0
    first_classes: set[str] = field(default_factory=set)  # distinct non-empty values in the first 1000 rows
    classes: set[str] = field(default_factory=set)  # distinct non-empty values, collected up to MAX_CLASSES + 1
    not_number: tuple[int, str] | None = None  # (row, value) of the first non-numeric value, for regression


@dataclass(frozen=True, slots=True)
class Rules:
    """One model's rules. Every field optional: ``Rules()`` checks nothing."""

    target: str | None = None
    task: Task | None = None
    columns: Columns = "no_missing"
    reference: tuple[str, ...] | None = None  # header_file's first row, else the last finished upload's header
    reference_from: str = ""  # where the reference came from, for messages
    max_empty_target_ratio: float = 0.5
    evaluation: bool = False  # the eval half of a pair: only the target's presence is a rule, its classes are kept

    def for_eval(self) -> Rules:
        return dataclasses.replace(self, reference=None, columns="any", evaluation=True)

    @property
    def active(self) -> bool:
        return self.target is not None or (self.reference is not None and self.columns != "any")

    def start(self, header: Sequence[str]) -> int | None:
        """Check the header; return the target's column index (None when there is no target rule)."""
        if self.target is None:
            return None
        try:
            return list(header).index(self.target)
        except ValueError:
            shown = ", ".join(repr(h) for h in header[:30]) + (", …" if len(header) > 30 else "")
            msg = (f"has no target column {self.target!r} (the model's `target`); its header is {shown}. "
                   "Rename the column or fix `target` in the config")
            hint = _rule_hint(f"target = {self.target!r}", f"Name the column to predict {self.target!r} in the "
                              "header row (or add it)", "`target`")
            raise RuleError(msg, hint=hint) from None

    def feed(self, stats: TargetStats, values: list[str]) -> None:
        """Account for the next ``values`` of the target column, in file order."""
        first_row = stats.rows + 2  # spreadsheet rows: the header is row 1
        stats.rows += len(values)
        stats.empty += values.count("")
        if self.task in ("binary", "multiclass"):
            head = FIRST_ROWS - (stats.rows - len(values))
            if head > 0:
                stats.first_classes.update(values[:head])
                stats.first_classes.discard("")
            if len(stats.classes) <= MAX_CLASSES:
                stats.classes.update(values)
                stats.classes.discard("")
        elif self.task == "regression" and stats.not_number is None:
            joined = "\n".join(values)
            if joined.count("\n") != len(values) - 1 or not _NUMBERS.fullmatch(joined):
                for i, v in enumerate(values):
                    if v and not _ONE_NUMBER.fullmatch(v):
                        stats.not_number = (first_row + i, v)
                        break

    def feed_raw(self, stats: TargetStats, values: list[bytes], encoding: str) -> None:
        """:meth:`feed` for whole unquoted fields as bytes (the fast path): only distinct values are decoded."""
        first_row = stats.rows + 2
        stats.rows += len(values)
        stats.empty += values.count(b"")
        if self.task in ("binary", "multiclass"):
            head = FIRST_ROWS - (stats.rows - len(values))
            if head > 0:
                stats.first_classes.update(v.decode(encoding) for v in set(values[:head]) if v)
            if len(stats.classes) <= MAX_CLASSES:
                stats.classes.update(v.decode(encoding) for v in set(values) if v)
        elif self.task == "regression" and stats.not_number is None and not _NUMBERS_B.fullmatch(b"\n".join(values)):
            for i, v in enumerate(values):
                if v and not _ONE_NUMBER_B.fullmatch(v):
                    stats.not_number = (first_row + i, v.decode(encoding, errors="replace"))
                    break

    def verdict(self, stats: TargetStats) -> list[str]:
        """Raise RuleError if the target breaks the task's rule; return the warnings."""
        warnings: list[str] = []
        if self.target is None or self.evaluation:
            return warnings
        t = repr(self.target)
        if stats.rows and stats.empty:
            ratio = stats.empty / stats.rows
            text = f"target {t} is empty in {stats.empty} of {stats.rows} data rows ({ratio:.0%})"
            if ratio > self.max_empty_target_ratio:
                msg = (f"{text}, more than max_empty_target_ratio {self.max_empty_target_ratio:g}; fill in the "
                       "target values (rows without a target teach the model nothing)")
                raise RuleError(msg, hint=_rule_hint(
                    f"max_empty_target_ratio = {self.max_empty_target_ratio:g}",
                    f"Fill in the {t} values (or remove the rows that have none)", "`max_empty_target_ratio`"))
            warnings.append(text)
        if self.task == "binary" and len(stats.first_classes) != 2:
            msg = (f"task is binary but target {t} has {len(stats.first_classes)} distinct value(s) in the first "
                   f"{FIRST_ROWS} data rows ({_some(stats.first_classes)}); binary classification needs exactly 2 "
                   "there (Prediction One decides the task from those rows)")
            raise RuleError(msg, hint=_rule_hint(
                'task = "binary"', f"Make {t} hold exactly 2 distinct values in the first {FIRST_ROWS} data rows "
                "(fix stray values, or sort the rows so that both classes appear near the top)", "`task`"))
        if self.task == "multiclass":
            if len(stats.first_classes) < 3:
                msg = (f"task is multiclass but target {t} has {len(stats.first_classes)} distinct value(s) in the "
                       f"first {FIRST_ROWS} data rows ({_some(stats.first_classes)}); multiclass needs at least 3 "
                       "there: put rows of every class near the top")
                raise RuleError(msg, hint=_rule_hint(
                    'task = "multiclass"', f"Put rows of at least 3 classes of {t} in the first {FIRST_ROWS} data "
                    "rows (e.g. shuffle the rows)", "`task`"))
            if len(stats.classes) > MAX_CLASSES:
                msg = (f"target {t} has more than {MAX_CLASSES} distinct values; Prediction One does not support more"
                       f" than {MAX_CLASSES} classes")
                raise RuleError(msg, hint=_rule_hint(
                    'task = "multiclass"', f"Group the values of {t} into at most {MAX_CLASSES} classes", "`task`"))
        if self.task == "regression" and stats.not_number is not None:
            row, value = stats.not_number
            msg = (f"task is regression but target {t} is not a number in row {row} ({_short(value)}); every "
                   "non-empty target value must be numeric (no units or thousands separators)")
            raise RuleError(msg, hint=_rule_hint(
                'task = "regression"', f"Make row {row}'s {t} value a plain number (like 1234.5, no units or "
                "thousands separators), and every other non-empty one", "`task`"))
        return warnings

    def compare_header(self, header: Sequence[str]) -> list[str]:
        """Compare with the reference header; raise RuleError on a refusal, return the warnings."""
        if self.reference is None or self.columns == "any":
            return []
        return compare_columns(header, self.reference, self.columns, self.reference_from)


def compare_columns(header: Sequence[str], reference: Sequence[str], mode: Columns, source: str) -> list[str]:
    have, want = set(header), set(reference)
    missing = [c for c in reference if c not in have]
    new = [c for c in header if c not in want]
    where = f" ({source})" if source else ""
    if missing:
        msg = (f"column(s) {_list(missing)} of the model's reference header{where} are missing or renamed; "
               "restore them (the model was trained with them)")
        fix = f"Restore the column(s) {_list(missing)} with the reference header's names"
        raise RuleError(msg, hint=_rule_hint(f'columns = "{mode}"', fix, "`columns` (or `header_file`)"))
    if new and mode == "same":
        msg = (f"column(s) {_list(new)} are not in the model's reference header{where} and `columns = \"same\"`; "
               "remove them, or set columns = \"no_missing\"")
        hint = _rule_hint('columns = "same"', f"Remove the column(s) {_list(new)}", "`columns` (or `header_file`)")
        raise RuleError(msg, hint=hint)
    return [f"new column(s) {_list(new)} not in the model's reference header{where}"] if new else []


def model_rules(model: ModelSettings, last_finished: tuple[int, tuple[str, ...]] | None) -> Rules:
    """The rules of ``model``; the reference header is ``header_file``'s first row, else ``last_finished``
    ((job id, header) of the model's last upload whose retraining finished, from the ledger), else none."""
    reference: tuple[str, ...] | None = None
    source = ""
    if model.header_file is not None:
        reference, source = read_header_file(model.header_file), f"header_file {model.header_file}"
    elif last_finished is not None:
        reference, source = last_finished[1], f"the header of job {last_finished[0]}, the last finished retraining"
    return Rules(target=model.target, task=model.task, columns=model.columns, reference=reference,
                 reference_from=source, max_empty_target_ratio=model.max_empty_target_ratio)


def read_header_file(path: Path) -> tuple[str, ...]:
    """The first row of a CSV/TSV (UTF-8, BOM allowed, or cp932); raises ValueError naming the file."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 20)
    except OSError as e:
        msg = f"header_file {path}: cannot read it: {e.strerror}"
        raise ValueError(msg) from e
    for encoding in ("utf-8", "cp932"):
        try:
            text = head.decode(encoding)
            break
        except UnicodeDecodeError as e:
            text = head[: e.start].decode(encoding) if e.start > len(head) - 4 else ""
    first = text.removeprefix(codecs.BOM_UTF8.decode()).splitlines()[0] if text.strip() else ""
    delimiter = "\t" if "\t" in first and "," not in first else ","
    row = next(csv.reader(io.StringIO(first), delimiter=delimiter), [])
    if not any(c.strip() for c in row):
        msg = f"header_file {path}: its first row holds no column names"
        raise ValueError(msg)
    return tuple(row)


def merge_classes(train: TargetStats, eval_: TargetStats, target: str) -> list[str]:
    """A pair: eval's classes should be train's (a class only in eval cannot be predicted)."""
    extra = sorted(eval_.classes - train.classes)
    if extra and len(train.classes) <= MAX_CLASSES:
        return [f"evaluation target {target!r} has class(es) not in the training data: {_some(set(extra))}"]
    return []


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def _some(values: set[str], limit: int = 5) -> str:
    shown = sorted(values)[:limit]
    return ", ".join(_short(v) for v in shown) + (", …" if len(values) > limit else "") if values else "none"


def _list(names: Sequence[str], limit: int = 10) -> str:
    return ", ".join(repr(n) for n in names[:limit]) + (", …" if len(names) > limit else "")
