# ruff: noqa: RUF001, RUF002, RUF003  -- this module is about look-alike characters: they are the data
"""Is a file that decodes as Shift_JIS/cp932 really cp932, or a cp1252 / Latin-1 / EUC-JP file that happens to decode?

cp932 accepts most byte strings, so "it decodes" proves little: "Curaçao" saved as cp1252 decodes as "Cura軋o", and
EUC-JP Japanese as half-width katakana noise. :func:`likely_misread` reads the non-ASCII parts of a sample three ways
and scores how much each reading looks like real text:

- cp932: Japanese words (runs of two or more kana/kanji), JIS level-1 kanji, the NEC/IBM symbols (①, ㈱, №), and
  half-width katakana runs that follow its spelling rules (ﾞ/ﾟ only after a kana that takes them, ｰ after a kana);
  a kanji wedged inside a Latin word ("Cura軋o"), a half-width ､/･ in the middle of a run (EUC-JP's kana lead
  bytes) and private-use characters count against it.
- cp1252 / Latin-1: lone accented letters and typographic marks (é, ç, ’, “, –, €) between ASCII characters. A mark
  followed by a backslash does not count: that is a cp932 character whose second byte is 0x5C (表, 能, ソ).
- EUC-JP (only when every byte is valid EUC-JP): kana, level-1 kanji and CJK punctuation.

The cp932 reading is kept unless another reading scores clearly higher; accuracy over the test corpus is measured in
tests/test_encodings.py. Pure functions on bytes: the caller decides how much of the file to sample.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["SAMPLE_BYTES", "likely_encoding", "likely_misread"]

SAMPLE_BYTES = 256 << 10  # of lines holding non-ASCII bytes; enough for a verdict, cheap to score

_NON_ASCII_RUN = re.compile(r"[^\x00-\x7f]+")
# Marks common in Latin text. Rare ones (±, ¬, ¤...) are left out: they are cp932 half-width katakana (ｱ, ｬ, ､).
_TYPOGRAPHIC = set("’‘“”–—…€•™°£§©®«»½²³·")
# ASCII punctuation that is also a cp932 second byte (0x40-0x7E): rare right after a Latin mark or letter.
_CP932_TRAIL_PUNCT = set("@[\\]^_`{|}~")
_HW_PUNCT = set("｡｢｣､･")  # U+FF61-FF65: EUC-JP's lead bytes 0xA1-0xA5 read as cp932
_DAKUTEN_OK = set("ｳｶｷｸｹｺｻｼｽｾｿﾀﾁﾂﾃﾄﾊﾋﾌﾍﾎ")
_HANDAKUTEN_OK = set("ﾊﾋﾌﾍﾎ")


def likely_misread(sample: bytes) -> str | None:
    """For a ``sample`` that decodes as cp932: the encoding it more likely is ("cp1252", "latin-1", "EUC-JP"), or
    None when cp932 is the best reading (including when the sample is plain ASCII)."""
    if sample.isascii():
        return None
    as_cp932 = sample.decode("cp932", errors="replace")
    scores = {"cp932": _cp932_score(as_cp932)}
    euc = _decode(sample, "euc_jp")
    if euc is not None:
        scores["EUC-JP"] = _euc_score(euc)
    latin = _decode(sample, "cp1252")
    name = "cp1252"
    if latin is None:
        latin, name = sample.decode("latin-1"), "latin-1"
    scores[name] = _latin_score(latin)
    best = max(scores, key=lambda k: scores[k])
    cp932 = scores["cp932"]
    if best == "cp932" or scores[best] < 0.5 or scores[best] <= max(cp932 * 1.2, cp932 + 0.5):
        return None
    return best


def likely_encoding(sample: bytes) -> str | None:
    """For a sample that is neither UTF-8 nor cp932: the encoding it most likely is, to name in the message."""
    if _decode(sample, "euc_jp") is not None and _euc_score(sample.decode("euc_jp")) >= 1:
        return "EUC-JP"
    if _decode(sample, "cp1252") is not None:
        return "cp1252"
    return "latin-1" if _latin_score(sample.decode("latin-1")) >= 1 else None


def _decode(sample: bytes, encoding: str) -> str | None:
    try:
        return sample.decode(encoding)
    except UnicodeDecodeError:
        return None


def _is_letter(c: str) -> bool:
    return c.isascii() and c.isalpha()


def _letter_trail(c: str) -> bool:
    try:
        encoded = c.encode("cp932")
    except UnicodeEncodeError:
        return False
    return len(encoded) == 2 and chr(encoded[1]).isalpha() and encoded[1] < 0x80


def _kind(c: str) -> str:
    o = ord(c)
    if 0x3041 <= o <= 0x30FF or o in (0x3005, 0x30FC):
        return "kana"
    if 0x4E00 <= o <= 0x9FFF:
        return "kanji"
    if 0xFF61 <= o <= 0xFF9F:
        return "halfwidth"
    if 0xE000 <= o <= 0xF8FF or c == "\ufffd":
        return "bad"
    return "symbol"


def _level1(c: str) -> bool:
    try:
        return 0xB0 <= c.encode("euc_jp")[0] <= 0xCF
    except UnicodeEncodeError:
        return False


def _cp932_score(text: str) -> float:
    score = 0.0
    for m in _NON_ASCII_RUN.finditer(text):
        run = m.group()
        before = text[m.start() - 1] if m.start() else ""
        after = text[m.end()] if m.end() < len(text) else ""
        if len(run) == 1 and _kind(run) == "kanji" and _is_letter(before) and _letter_trail(run):
            score -= 2  # "Cura軋o", "Don稚": a cp1252 letter or mark plus the next letter, read as one kanji
            continue
        if len(run) == 1 and _kind(run) == "halfwidth" and (_is_letter(before) or _is_letter(after)):
            score -= 0.6  # "ﾖsterreich": one half-width kana glued to a Latin word is an accented capital
            continue
        for i, c in enumerate(run):
            kind = _kind(c)
            if kind == "bad":
                score -= 2
            elif kind == "halfwidth":
                score += _halfwidth(run, i)
            elif kind in ("kana", "kanji"):
                mixed = any(_kind(n) == "halfwidth" for n in run[max(i - 1, 0): i + 2])
                if mixed:  # "ｹ筅､": half-width katakana glued to a kanji is EUC-JP read two bytes off
                    score -= 1.5
                else:
                    score += (1.0 if kind == "kana" or _level1(c) else 0.5) + (0.5 if len(run) > 1 else 0.0)
            elif unicodedata.category(c).startswith(("S", "N", "P")) or c == "\u3000":
                score += 1.0  # ①, ㈱, №, ※, 、。「」, full-width digits and letters
    return score


def _halfwidth(run: str, i: int) -> float:
    c, prev = run[i], run[i - 1] if i else ""
    if c in _HW_PUNCT:
        return -1.0 if len(run) > 1 else 0.0
    if c == "ﾞ":
        return 0.6 if prev in _DAKUTEN_OK else -1.5
    if c == "ﾟ":
        return 0.6 if prev in _HANDAKUTEN_OK else -1.5
    if c == "ｰ" or "ｧ" <= c <= "ｯ":  # long vowel mark, small kana: only after a kana
        return 0.6 if prev and "ｦ" <= prev <= "ﾝ" else -1.0
    return 0.6


def _euc_score(text: str) -> float:
    score = 0.0
    for m in _NON_ASCII_RUN.finditer(text):
        for c in m.group():
            kind = _kind(c)
            if kind == "kana":
                score += 1.5
            elif kind == "kanji":
                score += 1.0 if _level1(c) else 0.3
            elif kind == "halfwidth":
                score += 0.3
            elif kind == "bad":
                score -= 2
            else:
                score += 0.5
    return score


def _latin_score(text: str) -> float:
    score = 0.0
    for m in _NON_ASCII_RUN.finditer(text):
        run = m.group()
        after = text[m.end()] if m.end() < len(text) else ""
        if len(run) > 2 or (after and after in _CP932_TRAIL_PUNCT):
            # Latin text has lone accented letters; "‚ ‚¢", "•\" (表) or "–{" (本) is cp932 read as cp1252.
            score -= len(run)
            continue
        for c in run:
            if c in _TYPOGRAPHIC or (unicodedata.category(c).startswith("L") and "LATIN" in unicodedata.name(c, "")):
                # An upper-case accented letter (À-ß) is also a lone half-width katakana (ﾀ-ﾟ): weaker evidence.
                score += (1.0 if len(run) == 1 else 0.5) * (0.5 if "\xc0" <= c <= "\xdf" else 1.0)
            else:
                score -= 1.0
    return score
