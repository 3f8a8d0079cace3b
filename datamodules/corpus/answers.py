"""The one answer checker used by every spoken/text QA evaluation.

Rule (normalized containment):
  1. Both the response and each gold answer are normalized: lower case, punctuation
     removed, hyphens split, number words turned into digits ("twenty three" -> "23").
  2. A gold answer matches when its normalized token sequence occurs in the response's.
  3. A gold answer from a closed class (a number, a day of the week, a month) must moreover
     be the *last* member of that class the response mentions, so a reply that echoes the
     question ("five minus zero is zero") or lists steps on the way ("before Thursday come
     Wednesday and Tuesday, so ... is Wednesday") is credited only with its final answer.

A response is correct when any of the gold answers matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_UNITS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUE = {w: i for i, w in enumerate(_UNITS)} | {w: 10 * i for i, w in enumerate(_TENS) if w}
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october", "november", "december")  # fmt: skip


def number_to_words(n: int) -> str:
    """0..999 as English words: 23 -> 'twenty three', 105 -> 'one hundred five'."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_to_words supports 0..999, got {n}")
    if n < 20:
        return _UNITS[n]
    if n < 100:
        tens, unit = divmod(n, 10)
        return _TENS[tens] + ("" if unit == 0 else " " + _UNITS[unit])
    hundreds, rest = divmod(n, 100)
    head = _UNITS[hundreds] + " hundred"
    return head if rest == 0 else head + " " + number_to_words(rest)


def _words_to_digits(tokens: list[str]) -> list[str]:
    """Collapse runs of number words into digit tokens ('twenty', 'three' -> '23').

    Handles 0..999 as spoken: "one hundred and five", "twenty three". Two numbers said in
    a row that cannot form one ("three five") stay two numbers.
    """
    out: list[str] = []
    value: int | None = None  # the number being read, None outside a number
    for tok in tokens:
        word_value = _WORD_VALUE.get(tok)
        if value is not None:
            can_add_tens = word_value is not None and word_value >= 20 and value % 100 == 0 and value >= 100
            can_add_unit = (
                word_value is not None
                and word_value < 20
                and ((value % 100 == 0 and value >= 100) or (value % 10 == 0 and value % 100 >= 20))
            )
            if tok == "hundred" and value < 10:
                value *= 100
                continue
            if tok == "and" and value >= 100 and value % 100 == 0:
                continue
            if can_add_tens or can_add_unit:
                value += word_value
                continue
            out.append(str(value))
            value = None
        if word_value is not None:
            value = word_value
        else:
            out.append(tok)
    if value is not None:
        out.append(str(value))
    return out


def normalize_answer(text: str) -> list[str]:
    """Lower-case word tokens with number words turned into digits."""
    text = text.lower().replace("-", " ")
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)  # 1,000 -> 1000
    tokens = re.findall(r"[a-z]+(?:'[a-z]+)?|\d+", text)
    return _words_to_digits(tokens)


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    return n > 0 and any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


def check_answer(response: str, gold: str | Iterable[str]) -> bool:
    """True when `response` states one of the `gold` answers (see the module rule)."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("check_answer needs at least one gold answer")
    said = normalize_answer(response)
    for g in golds:
        want = normalize_answer(g)
        if not want:
            raise ValueError(f"gold answer {g!r} normalizes to nothing")
        closed_class = _closed_class(want)
        if closed_class is not None:
            mentioned = [t for t in said if _closed_class([t]) == closed_class]
            if mentioned and mentioned[-1] == want[0]:
                return True
        elif _contains(said, want):
            return True
    return False


def _closed_class(tokens: list[str]) -> str | None:
    """'number', 'day' or 'month' for a one-token answer of that class, else None."""
    if len(tokens) != 1:
        return None
    tok = tokens[0]
    if tok.isdigit():
        return "number"
    return "day" if tok in _DAYS else "month" if tok in _MONTHS else None
