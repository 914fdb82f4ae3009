"""Conversation → text pieces with roles: a prefix (system) and, per turn, prompt text and answer text.

Only answer text is trained on; keeping turns apart lets stage 2 mask prompts and truncate
whole turns. Built-in templates: `alpaca` and `chatml`; `tokenizer` renders with the tokenizer's
own Jinja chat template and recovers the turn boundaries by rendering growing prefixes.

`encode_text` is the one rule for turning rendered text into ids, and `encode_prompt` the one way a
chat becomes the ids a model continues: serving, evaluation and `orchestrator generate` use them, and
stage 2 trains on ids whose prompts are exactly these (see `orchestrator.data.sft`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence

from orchestrator.data.formats import Conversation
from orchestrator.errors import ConfigError, DataError

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
CHATML_START, CHATML_END = "<|im_start|>", "<|im_end|>"

# A Jinja chat template equivalent to the built-in chatml rendering, saved with trained tokenizers
# so that serving and `orchestrator generate` format prompts the way training did.
CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' }}"
    "{% if not loop.last or message['role'] != 'assistant' %}{{ '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class RenderedConversation:
    """Text of a conversation split for masking: prefix, then (prompt, answer) per turn."""

    prefix: str
    turns: tuple[tuple[str, str], ...]

    @property
    def text(self) -> str:
        return self.prefix + "".join(p + a for p, a in self.turns)


class ChatTemplate(Protocol):
    name: str

    def render(self, conversation: Conversation) -> RenderedConversation: ...

    def generation_prompt(self, user: str, system: str | None = None) -> str: ...


class AlpacaTemplate:
    """Stanford Alpaca's prompt format; the answer ends with the tokenizer's EOS token."""

    name = "alpaca"

    def __init__(self, eos_token: str):
        self.eos_token = eos_token

    def render(self, conversation: Conversation) -> RenderedConversation:
        prefix = (conversation.system or ALPACA_SYSTEM) + "\n\n"
        turns = tuple(
            (("\n\n" if i else "") + f"### Instruction:\n{user}\n\n### Response:\n", assistant + self.eos_token)
            for i, (user, assistant) in enumerate(conversation.turns)
        )
        return RenderedConversation(prefix, turns)

    def generation_prompt(self, user: str, system: str | None = None) -> str:
        return (system or ALPACA_SYSTEM) + "\n\n" + f"### Instruction:\n{user}\n\n### Response:\n"


class ChatMLTemplate:
    """<|im_start|>role\\ncontent<|im_end|>; the answer ends with <|im_end|>."""

    name = "chatml"

    def render(self, conversation: Conversation) -> RenderedConversation:
        system = conversation.system
        prefix = f"{CHATML_START}system\n{system}{CHATML_END}\n" if system else ""
        turns = tuple(
            (
                ("\n" if i else "") + f"{CHATML_START}user\n{user}{CHATML_END}\n{CHATML_START}assistant\n",
                assistant + CHATML_END,
            )
            for i, (user, assistant) in enumerate(conversation.turns)
        )
        return RenderedConversation(prefix, turns)

    def generation_prompt(self, user: str, system: str | None = None) -> str:
        prefix = f"{CHATML_START}system\n{system}{CHATML_END}\n" if system else ""
        return prefix + f"{CHATML_START}user\n{user}{CHATML_END}\n{CHATML_START}assistant\n"


class TokenizerTemplate:
    """The tokenizer's own Jinja chat template, split into turns by rendering growing prefixes."""

    name = "tokenizer"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("data.template=tokenizer, but the tokenizer has no chat_template; use alpaca or chatml")
        self.tokenizer = tokenizer

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def render(self, conversation: Conversation) -> RenderedConversation:
        messages = [{"role": m.role, "content": m.content} for m in conversation.messages]
        prefix = self._render(messages[:1], False) if conversation.system else ""
        done = prefix
        turns = []
        start = 1 if conversation.system else 0
        for j in range(start, len(messages), 2):
            before = self._render(messages[: j + 1], True)
            full = self._render(messages[: j + 2], False)
            if not (before.startswith(done) and full.startswith(before)):
                raise DataError(
                    f"{conversation.origin}: the tokenizer's chat template does not render conversations as growing "
                    "prefixes, so prompts cannot be masked; set data.template to alpaca or chatml"
                )
            turns.append((before[len(done) :], full[len(before) :]))
            done = full
        return RenderedConversation(prefix, tuple(turns))

    def generation_prompt(self, user: str, system: str | None = None) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._render(messages, True)


def select_template(name: str, tokenizer: Any) -> ChatTemplate:
    """The template for `data.template` ('auto' picks the tokenizer's own, else chatml or alpaca)."""
    if name == "auto":
        if getattr(tokenizer, "chat_template", None):
            name = "tokenizer"
        elif CHATML_START in tokenizer.get_vocab():
            name = "chatml"
        else:
            name = "alpaca"
    if name == "tokenizer":
        return TokenizerTemplate(tokenizer)
    if name == "chatml":
        return ChatMLTemplate()
    if name == "alpaca":
        if tokenizer.eos_token is None:
            raise ConfigError("the alpaca template needs a tokenizer with an eos_token")
        return AlpacaTemplate(tokenizer.eos_token)
    raise ConfigError(f"unknown template {name!r}; allowed: auto, tokenizer, alpaca, chatml")


def prompt_for_generation(template: ChatTemplate, messages: list[tuple[str, str]]) -> str:
    """Text the model continues for a chat ending in a user message: history rendered exactly as in
    training, then the generation prompt of the last user turn."""
    from orchestrator.data.formats import Message

    if not messages or messages[-1][0] != "user":
        raise DataError("a generation prompt needs messages ending with a user message")
    # A placeholder answer for the last turn; only its prompt part is kept.
    conversation = Conversation(tuple(Message(r, c) for r, c in messages) + (Message("assistant", "x"),),
                                "request")
    rendered = template.render(conversation)
    return rendered.prefix + "".join(p + a for p, a in rendered.turns[:-1]) + rendered.turns[-1][0]


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of rendered text. No special tokens are added: a template renders its own (BOS included)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(tokenizer: Any, template: ChatTemplate, messages: list[tuple[str, str]]) -> list[int]:
    """The ids a model continues for a chat ending in a user message: the prompt stage 2 trained after."""
    return encode_text(tokenizer, prompt_for_generation(template, messages))


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    if len(b) <= len(a) and list(a[: len(b)]) == list(b):
        return len(b)
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_continuation(tokenizer: Any, prompt: str, prompt_ids: list[int],
                       continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of `prompt + continuation` tokenized as one text, split where it stops
    agreeing with `prompt_ids` (= encode_text(prompt)); tokenized alone, a SentencePiece continuation would
    start with a lone '▁'."""
    whole = encode_text(tokenizer, prompt + continuation)
    shared = common_prefix_length(whole, prompt_ids)
    return whole[:shared], whole[shared:]
