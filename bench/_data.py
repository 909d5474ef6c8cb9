"""Benchmark input: realistic training CSVs, generated once and reused.

Ten columns of the kind a Prediction One user exports: ids, dates, quoted company names with commas, Japanese
prefecture names (UTF-8, so the multi-byte validation path runs), integers, floats, a category, a free-text
comment that is sometimes quoted and sometimes holds doubled quotes, and a 0/1 label.

A block of about 8 MB of distinct random rows is written over and over up to the size asked for, cut at a row
boundary. deflate only looks back 32 KiB, so this compresses exactly like fully random rows of the same kind,
while a 1 GB file takes a couple of seconds to write instead of a minute.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

HEADER = "customer_id,signup_date,company,prefecture,age,monthly_income,usage_score,plan,comment,churned\n"
GENERATOR_VERSION = "1"  # bump when the rows change, so cached files are rebuilt

_PREFECTURES = ["東京都", "大阪府", "神奈川県", "愛知県", "福岡県", "北海道", "京都府", "兵庫県", "埼玉県", "千葉県"]
_WORDS = ["fast", "support", "price", "renewal", "contract", "upgrade", "mobile", "billing", "late", "great",
          "slow", "network", "family", "discount", "app", "store", "call", "email", "refund", "plan"]
_PLANS = ["basic", "standard", "premium", "family", "business"]
_COMPANY = ["Sato", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Ito", "Yamamoto", "Nakamura", "Kobayashi", "Kato"]
_SUFFIX = ["Ltd.", "Inc.", "K.K.", "Trading", "Holdings"]


def _row(rng: random.Random, i: int) -> str:
    company = f"{rng.choice(_COMPANY)} {rng.choice(_SUFFIX)}"
    if rng.random() < 0.3:
        company = f'"{rng.choice(_COMPANY)}, {rng.choice(_SUFFIX)}"'  # a comma inside quotes
    words = " ".join(rng.choices(_WORDS, k=rng.randint(2, 7)))
    r = rng.random()
    if r < 0.2:
        comment = f'"{words}, {rng.choice(_WORDS)}"'
    elif r < 0.25:
        comment = f'"said ""{rng.choice(_WORDS)}"" twice"'  # doubled quotes inside a quoted field
    else:
        comment = words
    return (
        f"{100000 + i},20{rng.randint(15, 24):02d}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},"
        f"{company},{rng.choice(_PREFECTURES)},{rng.randint(18, 90)},{rng.uniform(1e5, 2e6):.0f},"
        f"{rng.uniform(0, 1):.4f},{rng.choice(_PLANS)},{comment},{int(rng.random() < 0.2)}\n"
    )


def make_block(seed: int, approx_bytes: int = 8 << 20) -> bytes:
    rng = random.Random(seed)
    rows: list[str] = []
    size, i = 0, 0
    while size < approx_bytes:
        row = _row(rng, i)
        rows.append(row)
        size += len(row.encode())
        i += 1
    return "".join(rows).encode()


def write_csv(path: Path, size_bytes: int, *, seed: int) -> Path:
    """Write a CSV of about ``size_bytes`` (header + whole rows) to ``path`` unless an identical one is there."""
    marker = path.with_name(path.name + f".v{GENERATOR_VERSION}-{size_bytes}-{seed}.ok")
    if path.exists() and marker.exists():
        return path
    block = make_block(seed)
    tmp = path.with_name(f".{path.name}.part")
    with open(tmp, "wb") as f:
        f.write(HEADER.encode())
        written = len(HEADER)
        while written + len(block) <= size_bytes:
            f.write(block)
            written += len(block)
        rest = size_bytes - written
        if rest > 0:
            cut = block.rfind(b"\n", 0, rest) + 1
            f.write(block[:cut] if cut > 0 else block[: block.find(b"\n") + 1])
    os.replace(tmp, path)
    for old in path.parent.glob(path.name + ".v*.ok"):
        old.unlink()
    marker.touch()
    return path


def small_csv(i: int) -> bytes:
    """A distinct ~1.5 KB CSV (different content each time, so no job is a duplicate of another)."""
    rng = random.Random(10_000_000 + i)
    return (HEADER + "".join(_row(rng, i * 100 + k) for k in range(12))).encode()
