"""Evaluation metric functions on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from orchestrator.evaluation import metrics


def test_text_units_are_characters_for_chinese_and_words_for_latin():
    assert metrics.text_units("发烧 38.5度, take Aspirin!") == ["发", "烧", "38", "5", "度", "take", "aspirin"]
    # NFKC: full-width letters and digits become ASCII; punctuation of both widths is dropped
    assert metrics.text_units("ＡＢＣ１２，多喝水。") == ["abc12", "多", "喝", "水"]
    assert metrics.text_units("  ，。!?  ") == []


def test_exact_match_ignores_case_width_punctuation_and_spaces():
    assert metrics.exact_match("食管克罗恩病。", "食管 克罗恩病") == 1.0
    assert metrics.exact_match("Crohn's Disease", "crohns disease") == 0.0  # "crohn" "s" vs "crohns"
    assert metrics.exact_match("ＣＴ检查", "ct检查") == 1.0
    assert metrics.exact_match("食管克罗恩病", "克罗恩病") == 0.0


def test_char_f1_counts_the_overlap_of_characters():
    # prediction 6 characters, reference 7, 5 in common (发 烧 多 喝 水): P = 5/6, R = 5/7, F1 = 10/13
    assert metrics.char_f1("发烧要多喝水", "发烧时应多喝水") == pytest.approx(10 / 13, abs=1e-12)
    # a bag, not a set: "水水" vs "水" -> common 1, P = 1/2, R = 1, F1 = 2/3
    assert metrics.char_f1("水水", "水") == pytest.approx(2 / 3, abs=1e-12)
    assert metrics.char_f1("喝水发烧", "发烧喝水") == 1.0
    assert metrics.char_f1("头痛", "发烧") == 0.0
    assert metrics.char_f1("", "") == 1.0
    assert metrics.char_f1("。", "发烧") == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    # LCS(发烧要多喝水, 发烧时应多喝水) = 发烧多喝水 = 5 -> same P, R as above
    assert metrics.rouge_l("发烧要多喝水", "发烧时应多喝水") == pytest.approx(10 / 13, abs=1e-12)
    # order matters: LCS(喝水发烧, 发烧喝水) = 2 -> P = R = 1/2
    assert metrics.rouge_l("喝水发烧", "发烧喝水") == pytest.approx(0.5, abs=1e-12)
    # LCS(ABCBDAB, BDCABA) = 4 (BCBA): P = 4/7, R = 4/6, F1 = 2*(4/7)(4/6)/((4/7)+(4/6)) = 8/13
    assert metrics.longest_common_subsequence("ABCBDAB", "BDCABA") == 4
    assert metrics.rouge_l("a b c b d a b", "b d c a b a") == pytest.approx(8 / 13, abs=1e-12)
    assert metrics.rouge_l("", "") == 1.0
    assert metrics.rouge_l("头痛", "发烧") == 0.0


def test_refusal_patterns_are_searched_case_insensitively():
    patterns = metrics.compile_patterns([r"不知道", r"\bI don't know\b"])
    assert metrics.is_refusal("抱歉，我不知道这种药。", patterns)
    assert metrics.is_refusal("i DON'T KNOW.", patterns)
    assert not metrics.is_refusal("推荐剂量为每日两次。", patterns)


def test_perplexity_bits_per_char_and_option_pick():
    assert metrics.perplexity(2 * math.log(4), 2) == pytest.approx(4.0)
    assert metrics.perplexity(1e9, 1) == pytest.approx(math.exp(50))  # capped, no overflow
    assert metrics.bits_per_character(math.log(2) * 6, 3) == pytest.approx(2.0)
    assert metrics.pick_option([-3.0, -1.0, -2.0, -1.0]) == 1  # first of the tied best
    with pytest.raises(ValueError):
        metrics.perplexity(1.0, 0)
