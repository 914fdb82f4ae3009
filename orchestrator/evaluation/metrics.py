"""Metric functions of the evaluation: pure, deterministic, no model.

Text metrics compare a generated answer with a reference after the same normalisation and
tokenisation (`text_units`): Unicode NFKC (full-width → half-width), lower case, punctuation and
whitespace dropped, every CJK character one unit and every run of Latin letters or digits one
unit. For Chinese this is character level, the usual choice for Chinese QA (it needs no word
segmenter and does not depend on the model's tokenizer), like the "mixed segmentation" of the
CMRC 2018 evaluation script.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from typing import Sequence

_WORD = re.compile(r"[^\W_]+")  # letters and digits of any script


def text_units(text: str) -> list[str]:
    """The units the text metrics count: every wide (CJK) character on its own, runs of other letters
    and digits (Latin words, numbers) as one unit; punctuation, symbols and whitespace dropped.

    >>> text_units("发烧 38.5度, take Aspirin!")
    ['发', '烧', '38', '5', '度', 'take', 'aspirin']
    """
    units: list[str] = []
    for run in _WORD.findall(unicodedata.normalize("NFKC", text).lower()):
        word = ""
        for char in run:
            if unicodedata.east_asian_width(char) == "W":
                if word:
                    units.append(word)
                    word = ""
                units.append(char)
            else:
                word += char
        if word:
            units.append(word)
    return units


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when both texts have the same units (case, width, punctuation and spaces ignored), else 0.0."""
    return 1.0 if text_units(prediction) == text_units(reference) else 0.0


def char_f1(prediction: str, reference: str) -> float:
    """F1 of the overlap of units (a bag: each unit counts as often as it occurs in both texts).

    Both texts empty (after normalisation) count as a match (1.0); one empty as 0.0.
    """
    pred, ref = text_units(prediction), text_units(reference)
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0  # row[j-1] of the previous row
        for j, y in enumerate(b, start=1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over `text_units` (characters for Chinese): LCS-based precision and recall, beta = 1.

    Unlike `char_f1`, order matters: "喝水发烧" against "发烧喝水" has F1 1.0 but ROUGE-L 0.5.
    """
    pred, ref = text_units(prediction), text_units(reference)
    if not pred or not ref:
        return 1.0 if pred == ref else 0.0
    lcs = longest_common_subsequence(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def is_refusal(answer: str, patterns: Sequence[re.Pattern]) -> bool:
    """True when any refusal pattern occurs in the answer (patterns compiled with re.IGNORECASE)."""
    return any(p.search(answer) for p in patterns)


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
    return [re.compile(p, re.IGNORECASE) for p in patterns]


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token); the mean is capped at 50 nats (exp overflow)."""
    if tokens <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(min(nll_sum / tokens, 50.0))


def bits_per_character(nll_sum: float, characters: int) -> float:
    """Negative log-likelihood in bits per character of text: comparable across tokenizers."""
    if characters <= 0:
        raise ValueError("bits per character needs at least one character")
    return nll_sum / math.log(2) / characters


def pick_option(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on a tie)."""
    if not scores:
        raise ValueError("no options to pick from")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("mean of no values")
    return sum(values) / len(values)
