"""Stage-2 examples are token-exact: the ids trained on are the rendered conversation tokenized as one text
(what generation and serving tokenize), the labels decode to exactly the answers, and the prompt of every
turn, built by `encode_prompt` as inference builds it, is the start of the training ids.

Over the shared SFT and multi-turn files, for three tokenizer families: the minimind byte-level BPE, a
LLaMA-style SentencePiece tokenizer trained here (BPE, dummy prefix, byte fallback) with the alpaca template
and with a LLaMA-2 chat template, and that chat template with BOS per turn and a default system prompt.
"""

from __future__ import annotations

import io
import json

import pytest

from orchestrator.config import DataSourceConfig
from orchestrator.data.formats import Conversation, Message, load_examples
from orchestrator.data.sft import IGNORE_INDEX, tokenize_conversations
from orchestrator.data.templates import encode_prompt, encode_text, select_template

# LLaMA-2's chat template (bos before every [INST], the system folded into the first user turn); the second
# variant puts in a default system prompt when the conversation has none.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = DEFAULT %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)
DEFAULT_SYSTEM = "You are a careful medical assistant. 请用中文回答。"
PROMPT_CHECK_EVERY = 5  # each turn's inference prompt re-renders the chat: checked on every 5th conversation


@pytest.fixture(scope="session")
def conversations(shared_data) -> list[Conversation]:
    """Every conversation of the shared SFT (2,000) and multi-turn (400, up to 9 turns) files."""
    sources = [DataSourceConfig(path=str(shared_data / "sft" / "medical_alpaca.jsonl"), format="alpaca"),
               DataSourceConfig(path=str(shared_data / "multiturn" / "medical_history.json"), format="alpaca")]
    found, _ = load_examples(sources, "conversations")
    assert len(found) == 2400
    return found


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory, shared_data):
    """A LLaMA-style SentencePiece model (BPE, dummy prefix, byte fallback) trained on the shared data."""
    import sentencepiece as spm

    texts = []
    for line in (shared_data / "sft" / "medical_alpaca.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record["instruction"], record["output"]]
    texts += (shared_data / "pretrain" / "medical" / "fever.txt").read_text(encoding="utf-8").split("\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for t in texts if t.strip()), model_writer=model, vocab_size=4000,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, split_digits=True,
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    directory = tmp_path_factory.mktemp("sentencepiece")
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    return directory


def _sentencepiece(directory, chat_template=None):
    from transformers import LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(str(directory))
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def families(sentencepiece_dir, minimind_tokenizer) -> dict[str, tuple]:
    """name → (tokenizer, template), each as stage 2 selects it."""
    sp = _sentencepiece(sentencepiece_dir)
    llama2 = _sentencepiece(sentencepiece_dir, LLAMA2_TEMPLATE.replace("DEFAULT", "false"))
    llama2_default = _sentencepiece(sentencepiece_dir, LLAMA2_TEMPLATE.replace("DEFAULT", repr(DEFAULT_SYSTEM)))
    chosen = {"sentencepiece+alpaca": sp, "sentencepiece+llama2": llama2,
              "sentencepiece+llama2-bos-default-system": llama2_default, "minimind": minimind_tokenizer}
    return {name: (tok, select_template("auto", tok)) for name, tok in chosen.items()}


def _label_runs(labels: list[int]) -> list[list[int]]:
    runs, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    return runs + ([current] if current else [])


def _same_text(decoded: str, expected: str) -> bool:
    # a SentencePiece decoder drops the dummy-prefix space of a sequence's first piece
    return decoded == expected or (expected.startswith(" ") and decoded == expected[1:])


@pytest.mark.parametrize("family", ["sentencepiece+alpaca", "sentencepiece+llama2",
                                    "sentencepiece+llama2-bos-default-system", "minimind"])
def test_training_ids_are_the_conversation_tokenized_as_one_text(family, families, conversations, caplog):
    tokenizer, template = families[family]
    expected_template = "alpaca" if family == "sentencepiece+alpaca" else "tokenizer"
    assert template.name == expected_template
    if template.name == "tokenizer":  # Jinja renders dominate the time: every 3rd conversation of both files
        conversations = conversations[::3]
    with caplog.at_level("WARNING", logger="orchestrator.data.sft"):
        examples, dropped = tokenize_conversations(conversations, tokenizer, template, max_length=100_000)
    assert dropped == 0 and len(examples) == len(conversations)
    assert "straddling" not in caplog.text
    wrong_ids, wrong_labels, wrong_prompts = [], [], []
    for index, (conversation, example) in enumerate(zip(conversations, examples)):
        rendered = template.render(conversation)
        ids = example.input_ids.tolist()
        if ids != encode_text(tokenizer, rendered.text):
            wrong_ids.append(conversation.origin)
        answers = [tokenizer.decode(run) for run in _label_runs(example.labels.tolist())]
        if len(answers) != len(rendered.turns) or not all(
                _same_text(got, answer) for got, (_, answer) in zip(answers, rendered.turns)):
            wrong_labels.append(conversation.origin)
        if index % PROMPT_CHECK_EVERY:
            continue
        # every turn's prompt, as serving builds it, is the start of the training ids
        chat = [(m.role, m.content) for m in conversation.messages]
        for end in [i for i, (role, _) in enumerate(chat) if role == "assistant"]:
            prompt = encode_prompt(tokenizer, template, chat[:end])
            if ids[: len(prompt)] != prompt or example.labels[len(prompt) - 1] != IGNORE_INDEX \
                    or example.labels[len(prompt)] == IGNORE_INDEX:
                wrong_prompts.append(conversation.origin)
                break
    assert (wrong_ids[:3], wrong_labels[:3], wrong_prompts[:3]) == ([], [], [])


def test_sentencepiece_answer_has_no_lone_dummy_prefix_piece(families):
    """The case the old piecewise tokenization got wrong: an answer tokenized on its own starts with '▁'."""
    tokenizer, template = families["sentencepiece+alpaca"]
    conversation = Conversation((Message("user", "发烧怎么办？"), Message("assistant", "多喝水，注意休息。")), "t#0")
    (example,), _ = tokenize_conversations([conversation], tokenizer, template, max_length=4096)
    alone = tokenizer.convert_ids_to_tokens(encode_text(tokenizer, "多喝水，注意休息。"))
    assert alone[0] == "▁"  # what tokenizing the answer separately produced
    trained = [t for t, label in zip(example.input_ids.tolist(), example.labels.tolist()) if label != IGNORE_INDEX]
    assert tokenizer.convert_ids_to_tokens(trained)[0] != "▁"
    assert example.input_ids.tolist() == encode_text(tokenizer, template.render(conversation).text)


def test_a_boundary_token_that_straddles_prompt_and_answer_is_counted(minimind_tokenizer, caplog):
    """A template whose prompt ends inside a word: '医' + '生' is one BPE token ('医生'); the example is reported,
    its ids stay those of the whole text."""
    from orchestrator.data.templates import RenderedConversation

    class GluedTemplate:
        name = "glued"

        def render(self, conversation):
            return RenderedConversation("", (("患者问：我该看哪位医", "生？<|im_end|>"),))

    conversation = Conversation((Message("user", "x"), Message("assistant", "y")), "glued#0")
    mismatched: list[str] = []
    (example,), _ = tokenize_conversations([conversation], minimind_tokenizer, GluedTemplate(), 4096,
                                           mismatched=mismatched)
    assert mismatched == ["glued#0"]
    assert example.input_ids.tolist() == encode_text(minimind_tokenizer, "患者问：我该看哪位医生？<|im_end|>")
    with caplog.at_level("WARNING"):
        tokenize_conversations([conversation], minimind_tokenizer, GluedTemplate(), 4096)
    assert "1 of 1 stage-2 example(s) have a token straddling" in caplog.text


def test_an_option_scored_after_a_prompt_is_tokenized_as_it_follows_the_prompt(families):
    """Multiple-choice scoring: the option's ids are those it has after the prompt in one text."""
    from orchestrator.data.templates import split_continuation

    tokenizer, template = families["sentencepiece+alpaca"]
    prompt = template.generation_prompt("以下哪项是发热的常见原因？A. 感染 B. 骨折\n答案：")
    prompt_ids = encode_text(tokenizer, prompt)
    context, option = split_continuation(tokenizer, prompt, prompt_ids, "A")
    assert context + option == encode_text(tokenizer, prompt + "A")
    assert context == prompt_ids and tokenizer.convert_ids_to_tokens(option) == ["A"]
    assert tokenizer.convert_ids_to_tokens(encode_text(tokenizer, "A"))[0] == "▁"  # tokenized alone


@pytest.mark.parametrize("family", ["sentencepiece+alpaca", "sentencepiece+llama2", "minimind"])
def test_preference_answers_follow_the_same_rule(family, families, conversations, caplog):
    """Stage 3 encodes chosen and rejected by stage 2's rule: the ids are prompt + answer tokenized as one
    text and the labels decode to exactly the answer and its end of turn."""
    from orchestrator.data.preference import PreferencePair, encode_pairs, render_prompt_answer

    tokenizer, template = families[family]
    pairs = [PreferencePair(c.messages[:-1], c.messages[-1].content, other.messages[-1].content, c.origin)
             for c, other in zip(conversations[:120:2], conversations[1:120:2])]
    with caplog.at_level("WARNING", logger="orchestrator.data.sft"):
        columns = encode_pairs(pairs, tokenizer, template, max_length=100_000)
    assert "straddling" not in caplog.text
    wrong = []
    for i, pair in enumerate(pairs):
        for side, answer in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            prompt_text, answer_text = render_prompt_answer(template, pair.prompt, answer, pair.origin)
            ids, labels = columns[f"{side}_input_ids"][i].tolist(), columns[f"{side}_labels"][i].tolist()
            (trained,) = _label_runs(labels)
            if ids != encode_text(tokenizer, prompt_text + answer_text) or \
                    not _same_text(tokenizer.decode(trained), answer_text) or labels[-1] == IGNORE_INDEX:
                wrong.append((pair.origin, side))
    assert wrong[:3] == []
