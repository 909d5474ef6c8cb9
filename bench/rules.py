#!/usr/bin/env python3
"""Benchmark row "check + hash with model rules": check_csv on one large CSV without rules, with a binary target,
a regression target and a reference header (columns), in MB/s (target >= 100 MB/s each).

    .venv/bin/python bench/rules.py [--size-mb N]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from retrain_uploader.checks import check_csv
from retrain_uploader.rules import Rules


def make(path: Path, size_mb: int) -> None:
    rng = random.Random(1)
    rows = [",".join([str(rng.randint(0, 99999)), f"{rng.random():.6f}", rng.choice(["tokyo", "osaka", "nagoya"]),
                      str(rng.randint(0, 1)), f"{rng.uniform(0, 1000):.2f}", "x" * rng.randint(5, 40)]) + "\n"
            for _ in range(5000)]
    block = "".join(rows).encode()
    with path.open("wb") as f:
        f.write(b"id,score,city,churn,amount,note\n")
        for _ in range(size_mb * (1 << 20) // len(block) + 1):
            f.write(block)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.csv"
        make(path, args.size_mb)
        size = path.stat().st_size
        cases = {
            "no rules": Rules(),
            "binary target": Rules(target="churn", task="binary"),
            "regression target": Rules(target="amount", task="regression"),
            "multiclass target": Rules(target="city", task="multiclass"),
            "columns vs reference": Rules(reference=("id", "score", "city", "churn", "amount", "note")),
        }
        out = {}
        for name, rules in cases.items():
            best = min(_timed(path, rules) for _ in range(2))
            out[name] = round(size / best / 1e6, 1)
            print(f"{name:<22} {out[name]:>8.1f} MB/s  {'PASS' if out[name] >= 100 else 'FAIL'} (target >= 100)")
        print(json.dumps({"size_bytes": size, "mb_per_s": out}))


def _timed(path: Path, rules: Rules) -> float:
    t0 = time.perf_counter()
    check_csv(path, rules=rules)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
