"""Word lists (e.g. THUOCL): one term per line, or `term<TAB>frequency`."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Optional

from orchestrator import storage
from orchestrator.errors import DataError, DataValidationError, RecordError

MAX_ERRORS_LISTED = 10


@dataclass(frozen=True)
class Term:
    """One word-list entry; `frequency` is None when the line has none (`term` or `term<TAB>`)."""

    text: str
    frequency: Optional[int]
    origin: str


def read_wordlist(uri: str) -> list[Term]:
    """Every term of a word list (local path or URI), first occurrence of a duplicate kept.

    Raises DataValidationError listing the bad lines (file:line, field, what was expected).
    """
    raw = storage.read_bytes(uri)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        message = f"{uri}:{line}: not valid UTF-8 text (byte {exc.start}); re-save the word list as UTF-8"
        raise DataError(message) from None
    terms: dict[str, Term] = {}
    errors: list[RecordError] = []
    bad = 0
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        origin = f"{uri}:{number}"
        try:
            term = _parse_line(line, origin)
        except RecordError as err:
            bad += 1
            if len(errors) < MAX_ERRORS_LISTED:
                errors.append(err)
            continue
        terms.setdefault(term.text, term)
    if bad:
        raise DataValidationError(errors, bad)
    if not terms:
        raise DataError(f"{uri}: the word list has no terms")
    return list(terms.values())


def _parse_line(line: str, origin: str) -> Term:
    parts = line.split("\t")
    if len(parts) > 2:
        raise RecordError(origin, "(line)", "one term, or term<TAB>frequency (at most one tab)", line)
    term = parts[0].strip()
    if not term:
        raise RecordError(origin, "term", "a non-empty term before the tab", line)
    frequency = parts[1].strip() if len(parts) == 2 else ""
    if not frequency:  # `term<TAB>` with nothing after it occurs in real lists (THUOCL_law.txt)
        return Term(term, None, origin)
    if not frequency.isdigit():
        raise RecordError(origin, "frequency", "a whole number", frequency)
    return Term(term, int(frequency), origin)


def by_frequency(terms: Iterable[Term]) -> list[Term]:
    """Most frequent first; terms without a frequency after those with one, in file order."""
    return sorted(terms, key=lambda t: -1 if t.frequency is None else -t.frequency - 1)


def count_occurrences(terms: Iterable[str], texts: Iterable[str]) -> Counter:
    """How often each term (2+ characters) occurs in `texts`, overlaps included.

    Indexes the terms by their first two characters and walks each text once: ~25x faster than
    one `str.count` per term for a 28k-term list on a statute corpus.
    """
    by_prefix: dict[str, list[str]] = defaultdict(list)
    for term in set(terms):
        if len(term) >= 2:
            by_prefix[term[:2]].append(term)
    counts: Counter = Counter()
    for text in texts:
        for i in range(len(text) - 1):
            candidates = by_prefix.get(text[i : i + 2])
            if candidates:
                for term in candidates:
                    if text.startswith(term, i):
                        counts[term] += 1
    return counts
