"""Chat templates (exact renderings) and stage-2 tokenization: masking and truncation."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator.data.formats import Conversation, Message
from orchestrator.data.sft import IGNORE_INDEX, build_example, tokenize_conversations, truncate_turns
from orchestrator.data.templates import (
    ALPACA_SYSTEM,
    CHATML_JINJA,
    AlpacaTemplate,
    ChatMLTemplate,
    RenderedConversation,
    TokenizerTemplate,
    select_template,
)
from orchestrator.errors import ConfigError

THREE_TURNS = Conversation(
    (
        Message("system", "You are a careful doctor."),
        Message("user", "我发烧了。"),
        Message("assistant", "体温多少度？"),
        Message("user", "39度。"),
        Message("assistant", "请多喝水，注意休息。"),
        Message("user", "需要吃药吗？"),
        Message("assistant", "可以服用退烧药，如持续高烧请就医。"),
    ),
    "test#0",
)
NO_SYSTEM = Conversation(THREE_TURNS.messages[1:], "test#1")


def _chat(conv: Conversation) -> list[dict]:
    return [{"role": m.role, "content": m.content} for m in conv.messages]


# --- templates -------------------------------------------------------------------------------


def test_chatml_exact_rendering():
    r = ChatMLTemplate().render(THREE_TURNS)
    assert r == RenderedConversation(
        "<|im_start|>system\nYou are a careful doctor.<|im_end|>\n",
        (
            ("<|im_start|>user\n我发烧了。<|im_end|>\n<|im_start|>assistant\n", "体温多少度？<|im_end|>"),
            ("\n<|im_start|>user\n39度。<|im_end|>\n<|im_start|>assistant\n", "请多喝水，注意休息。<|im_end|>"),
            ("\n<|im_start|>user\n需要吃药吗？<|im_end|>\n<|im_start|>assistant\n", "可以服用退烧药，如持续高烧请就医。<|im_end|>"),
        ),
    )
    assert r.text == (
        "<|im_start|>system\nYou are a careful doctor.<|im_end|>\n"
        "<|im_start|>user\n我发烧了。<|im_end|>\n<|im_start|>assistant\n体温多少度？<|im_end|>\n"
        "<|im_start|>user\n39度。<|im_end|>\n<|im_start|>assistant\n请多喝水，注意休息。<|im_end|>\n"
        "<|im_start|>user\n需要吃药吗？<|im_end|>\n<|im_start|>assistant\n可以服用退烧药，如持续高烧请就医。<|im_end|>"
    )


def test_chatml_without_system_has_empty_prefix():
    r = ChatMLTemplate().render(NO_SYSTEM)
    assert r.prefix == ""
    assert r.turns[0][0] == "<|im_start|>user\n我发烧了。<|im_end|>\n<|im_start|>assistant\n"


def test_chatml_matches_its_jinja_template(small_tokenizer):
    assert small_tokenizer.chat_template == CHATML_JINJA
    for conv in (THREE_TURNS, NO_SYSTEM):
        expected = small_tokenizer.apply_chat_template(_chat(conv), tokenize=False)
        assert ChatMLTemplate().render(conv).text == expected
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert ChatMLTemplate().generation_prompt("U", "S") == small_tokenizer.apply_chat_template(
        prompt, tokenize=False, add_generation_prompt=True
    )


def test_alpaca_exact_rendering():
    r = AlpacaTemplate("</s>").render(THREE_TURNS)
    assert r == RenderedConversation(
        "You are a careful doctor.\n\n",
        (
            ("### Instruction:\n我发烧了。\n\n### Response:\n", "体温多少度？</s>"),
            ("\n\n### Instruction:\n39度。\n\n### Response:\n", "请多喝水，注意休息。</s>"),
            ("\n\n### Instruction:\n需要吃药吗？\n\n### Response:\n", "可以服用退烧药，如持续高烧请就医。</s>"),
        ),
    )
    assert r.text == (
        "You are a careful doctor.\n\n"
        "### Instruction:\n我发烧了。\n\n### Response:\n体温多少度？</s>\n\n"
        "### Instruction:\n39度。\n\n### Response:\n请多喝水，注意休息。</s>\n\n"
        "### Instruction:\n需要吃药吗？\n\n### Response:\n可以服用退烧药，如持续高烧请就医。</s>"
    )


def test_alpaca_default_system_and_generation_prompt():
    r = AlpacaTemplate("</s>").render(NO_SYSTEM)
    assert r.prefix == ALPACA_SYSTEM + "\n\n"
    assert AlpacaTemplate("</s>").generation_prompt("Q") == ALPACA_SYSTEM + "\n\n### Instruction:\nQ\n\n### Response:\n"


def test_tokenizer_template_reproduces_apply_chat_template(minimind_tokenizer):
    template = TokenizerTemplate(minimind_tokenizer)
    for conv in (THREE_TURNS, NO_SYSTEM):
        r = template.render(conv)
        assert r.text == minimind_tokenizer.apply_chat_template(_chat(conv), tokenize=False)
        assert len(r.turns) == 3
    r = template.render(THREE_TURNS)
    assert r.prefix == "<|im_start|>system\nYou are a careful doctor.<|im_end|>\n"
    assert r.turns[0] == (
        "<|im_start|>user\n我发烧了。<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
        "体温多少度？<|im_end|>\n",
    )
    assert template.generation_prompt("U", "S") == minimind_tokenizer.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenize=False, add_generation_prompt=True
    )


def test_select_template(minimind_tokenizer, small_tokenizer):
    assert select_template("auto", minimind_tokenizer).name == "tokenizer"
    assert select_template("chatml", minimind_tokenizer).name == "chatml"
    alpaca = select_template("alpaca", minimind_tokenizer)
    assert alpaca.name == "alpaca" and alpaca.eos_token == "<|im_end|>"
    no_template_chatml = SimpleNamespace(chat_template=None, get_vocab=lambda: {"<|im_start|>": 1}, eos_token="</s>")
    assert select_template("auto", no_template_chatml).name == "chatml"
    plain = SimpleNamespace(chat_template=None, get_vocab=lambda: {"a": 1}, eos_token="</s>")
    assert select_template("auto", plain).name == "alpaca"
    with pytest.raises(ConfigError, match="has no chat_template"):
        select_template("tokenizer", plain)
    with pytest.raises(ConfigError, match="needs a tokenizer with an eos_token"):
        select_template("alpaca", SimpleNamespace(chat_template=None, get_vocab=lambda: {}, eos_token=None))
    with pytest.raises(ConfigError, match="unknown template 'vicuna'"):
        select_template("vicuna", small_tokenizer)


# --- masking ---------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _expected(tokenizer, rendered: RenderedConversation, trained_turns: set[int]) -> tuple[list[int], list[int]]:
    ids = _encode(tokenizer, rendered.prefix)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (prompt, answer) in enumerate(rendered.turns):
        p, a = _encode(tokenizer, prompt), _encode(tokenizer, answer)
        ids += p + a
        labels += [IGNORE_INDEX] * len(p) + (a if i in trained_turns else [IGNORE_INDEX] * len(a))
    return ids, labels


@pytest.mark.parametrize("tokenizer_name", ["minimind_tokenizer", "small_tokenizer"])
@pytest.mark.parametrize("template_name", ["tokenizer", "chatml", "alpaca"])
def test_masking_is_token_exact(request, tokenizer_name, template_name):
    tokenizer = request.getfixturevalue(tokenizer_name)
    template = select_template(template_name, tokenizer)
    examples, dropped = tokenize_conversations([THREE_TURNS, NO_SYSTEM], tokenizer, template, max_length=4096)
    assert dropped == 0 and len(examples) == 2
    for conv, example in zip((THREE_TURNS, NO_SYSTEM), examples):
        ids, labels = _expected(tokenizer, template.render(conv), {0, 1, 2})
        assert example.input_ids.dtype == np.int32 and example.labels.dtype == np.int32
        assert example.input_ids.tolist() == ids
        assert example.labels.tolist() == labels
        trained = example.labels != IGNORE_INDEX
        assert (example.labels[trained] == example.input_ids[trained]).all()


def test_masking_regions_with_minimind(minimind_tokenizer):
    tok = minimind_tokenizer
    template = TokenizerTemplate(tok)
    (example,), _ = tokenize_conversations([THREE_TURNS], tok, template, max_length=4096)
    r = template.render(THREE_TURNS)
    n_prefix = len(_encode(tok, r.prefix))
    assert n_prefix > 0
    assert (example.labels[:n_prefix] == IGNORE_INDEX).all()
    position = n_prefix
    for prompt, answer in r.turns:
        p, a = _encode(tok, prompt), _encode(tok, answer)
        assert (example.labels[position : position + len(p)] == IGNORE_INDEX).all()
        position += len(p)
        assert example.labels[position : position + len(a)].tolist() == a
        assert tok.eos_token_id in a  # <|im_end|> is a single special token inside the answer
        position += len(a)
    assert position == len(example.input_ids)


def test_train_on_last_assistant_turn_masks_earlier_answers(minimind_tokenizer):
    tok = minimind_tokenizer
    template = TokenizerTemplate(tok)
    (example,), _ = tokenize_conversations(
        [THREE_TURNS], tok, template, max_length=4096, train_on="last_assistant_turn"
    )
    ids, labels = _expected(tok, template.render(THREE_TURNS), {2})
    assert example.input_ids.tolist() == ids
    assert example.labels.tolist() == labels
    last_answer = _encode(tok, template.render(THREE_TURNS).turns[-1][1])
    assert [x for x in example.labels.tolist() if x != IGNORE_INDEX] == last_answer


def test_tokenize_conversations_truncates_to_max_length(minimind_tokenizer):
    tok = minimind_tokenizer
    template = TokenizerTemplate(tok)
    r = template.render(THREE_TURNS)
    prefix = _encode(tok, r.prefix)
    last_prompt, last_answer = _encode(tok, r.turns[-1][0]), _encode(tok, r.turns[-1][1])
    fits = len(prefix) + len(last_prompt) + len(last_answer)

    # room for the system prefix and the last turn: the two earlier turns are dropped whole
    (example,), dropped = tokenize_conversations([THREE_TURNS], tok, template, max_length=fits)
    assert dropped == 0
    assert example.input_ids.tolist() == prefix + last_prompt + last_answer
    assert example.labels.tolist() == [IGNORE_INDEX] * (len(prefix) + len(last_prompt)) + last_answer

    # three tokens less: the prefix still has over half the budget, so the prompt loses its first 3 tokens
    budget = fits - 3 - len(prefix)
    assert budget >= (fits - 3) // 2 and len(last_prompt) - 3 >= budget // 2
    (example,), _ = tokenize_conversations([THREE_TURNS], tok, template, max_length=fits - 3)
    assert example.input_ids.tolist() == prefix + last_prompt[3:] + last_answer
    assert example.labels.tolist() == [IGNORE_INDEX] * (len(prefix) + len(last_prompt) - 3) + last_answer


# --- truncation ------------------------------------------------------------------------------


def test_truncate_keeps_everything_that_fits():
    prefix, turns = [1, 2], [([10, 11], [12]), ([20], [21, 22])]
    assert truncate_turns(prefix, turns, 8) == (prefix, turns)


def test_truncate_drops_oldest_turns_first():
    prefix = [1, 2]
    turns = [([10, 11], [12]), ([20, 21], [22, 23]), ([30], [31])]
    assert truncate_turns(prefix, turns, 8) == ([1, 2], [([20, 21], [22, 23]), ([30], [31])])
    assert truncate_turns(prefix, turns, 7) == ([1, 2], [([30], [31])])


def test_truncate_single_turn_left_truncates_the_prompt():
    prefix = [1, 2, 3, 4]
    prompt = list(range(10, 20))
    answer = list(range(30, 36))
    # budget 8 after the prefix: the prompt keeps max(8 - 6, 8 // 2) = 4 tokens (its end); the answer 4
    assert truncate_turns(prefix, [(prompt, answer)], 12) == ([1, 2, 3, 4], [([16, 17, 18, 19], [30, 31, 32, 33])])


def test_truncate_keeps_whole_answer_when_it_fits():
    prompt = list(range(10, 30))
    answer = [40, 41]
    assert truncate_turns([], [(prompt, answer)], 16) == ([], [(list(range(16, 30)), [40, 41])])


def test_truncate_drops_a_prefix_that_leaves_less_than_half():
    prefix = list(range(100, 110))
    turns = [([1, 2, 3, 4, 5], [6, 7, 8, 9, 10])]
    assert truncate_turns(prefix, turns, 16) == ([], turns)


def test_build_example_with_empty_answer_is_none():
    assert build_example([1], [([2, 3], [])], 16) is None


def test_build_example_last_turn_only():
    example = build_example([1], [([2], [3, 4]), ([5], [6])], 16, train_on="last_assistant_turn")
    assert example.input_ids.tolist() == [1, 2, 3, 4, 5, 6]
    assert example.labels.tolist() == [IGNORE_INDEX] * 5 + [6]


def test_truncation_properties_random():
    rng = random.Random(1234)
    for case in range(3000):
        next_id = iter(range(1, 10**6))
        prefix = [next(next_id) for _ in range(rng.randint(0, 40))]
        turns = [
            ([next(next_id) for _ in range(rng.randint(0, 60))], [next(next_id) for _ in range(rng.randint(1, 60))])
            for _ in range(rng.randint(1, 6))
        ]
        max_length = rng.choice([rng.randint(1, 16), rng.randint(16, 300)])
        train_on = rng.choice(["all_assistant_turns", "last_assistant_turn"])
        where = f"case {case}: prefix={len(prefix)} turns={[(len(p), len(a)) for p, a in turns]} max={max_length}"

        new_prefix, new_turns = truncate_turns(prefix, turns, max_length)
        total = len(new_prefix) + sum(len(p) + len(a) for p, a in new_turns)
        assert total <= max_length, where
        assert new_prefix in ([], prefix), where
        # oldest turns go first: what is left is the newest turns, all but the first untouched
        k = len(new_turns)
        assert 1 <= k <= len(turns), where
        assert new_turns[1:] == turns[len(turns) - k + 1 :], where
        kept_prompt, kept_answer = new_turns[0]
        orig_prompt, orig_answer = turns[len(turns) - k]
        assert len(kept_answer) >= 1, where
        assert kept_answer == orig_answer[: len(kept_answer)], where  # the answer keeps its start
        assert kept_prompt == orig_prompt[len(orig_prompt) - len(kept_prompt) :], where  # the prompt its end
        if k > 1:
            assert (kept_prompt, kept_answer) == (orig_prompt, orig_answer), where
        # the last answer always survives (at least its first token)
        assert new_turns[-1][1][0] == turns[-1][1][0], where
        # nothing is cut when everything fits
        if len(prefix) + sum(len(p) + len(a) for p, a in turns) <= max_length:
            assert (new_prefix, new_turns) == (prefix, turns), where

        example = build_example(prefix, turns, max_length, train_on)
        assert example is not None, where
        assert len(example.input_ids) == total <= max_length, where
        assert len(example.labels) == len(example.input_ids), where
        trained = example.labels != IGNORE_INDEX
        assert trained.any(), where
        assert (example.labels[trained] == example.input_ids[trained]).all(), where


def test_truncation_drops_the_system_prefix_before_cutting_the_answer():
    prefix = list(range(100, 108))  # 8 tokens of system prompt
    turn = (list(range(5)), list(range(200, 210)))  # 5 prompt + 10 answer tokens
    kept_prefix, kept_turns = truncate_turns(prefix, [turn], max_length=16)
    assert kept_prefix == [] and kept_turns == [turn]
