"""Stage-2 token exactness: how many examples train on ids that differ from the conversation tokenized as
one text (what generation and serving tokenize), before and after #16.

    PYTHONPATH=$PWD .venv/bin/python bench/sft_token_exactness.py

Data: every conversation of the shared SFT (2,000) and multi-turn (400) files. Tokenizers: a LLaMA-style
SentencePiece model trained here (BPE, dummy prefix, byte fallback, vocab 4,000) with the alpaca template
(it has no chat template), with LLaMA-2's chat template, and with that template plus a default system
prompt; the shared minimind byte-level BPE with its own template and with alpaca.

* before: the code before #16, which tokenized the prefix, every prompt and every answer separately and
  concatenated the pieces (re-implemented here as `piecewise_ids`).
* after: `orchestrator.data.sft.tokenize_conversations` (the whole text once, cut at verified boundaries).

Prints one row per tokenizer/template: examples whose ids differ from the one-text ids, before and after,
examples with a straddling boundary token, and the seconds each path took (rendering included).
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data"

from orchestrator.config import DataSourceConfig  # noqa: E402
from orchestrator.data.formats import load_examples  # noqa: E402
from orchestrator.data.pretrain import encode_texts  # noqa: E402
from orchestrator.data.sft import tokenize_conversations  # noqa: E402
from orchestrator.data.templates import select_template  # noqa: E402
from orchestrator.model.loading import load_tokenizer  # noqa: E402

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


def sentencepiece_dir() -> str:
    import sentencepiece as spm

    texts = []
    for line in (SHARED / "sft" / "medical_alpaca.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [record["instruction"], record["output"]]
    texts += (SHARED / "pretrain" / "medical" / "fever.txt").read_text(encoding="utf-8").split("\n")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(t for t in texts if t.strip()), model_writer=model, vocab_size=4000,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=True, split_digits=True,
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    directory = tempfile.mkdtemp(prefix="sp-")
    Path(directory, "tokenizer.model").write_bytes(model.getvalue())
    return directory


def piecewise_ids(rendered_list, tokenizer) -> list[list[int]]:
    """The pre-#16 stage-2 ids: prefix, prompts and answers tokenized separately, then concatenated."""
    texts = []
    for r in rendered_list:
        texts.append(r.prefix)
        for prompt, answer in r.turns:
            texts.extend((prompt, answer))
    ids = iter(encode_texts(texts, tokenizer))
    out = []
    for r in rendered_list:
        row = list(next(ids))
        for _ in r.turns:
            row += list(next(ids)) + list(next(ids))
        out.append(row)
    return out


def main() -> None:
    from transformers import LlamaTokenizer

    sources = [DataSourceConfig(path=str(SHARED / "sft" / "medical_alpaca.jsonl"), format="alpaca"),
               DataSourceConfig(path=str(SHARED / "multiturn" / "medical_history.json"), format="alpaca")]
    conversations, _ = load_examples(sources, "conversations")
    sp_dir = sentencepiece_dir()

    def sp(template=None):
        tokenizer = LlamaTokenizer.from_pretrained(sp_dir)
        tokenizer.chat_template = template
        return tokenizer

    minimind = str(SHARED / "tokenizers" / "minimind")
    cases = [
        ("sentencepiece + alpaca", sp(), "auto"),
        ("sentencepiece + LLaMA-2 chat template", sp(LLAMA2_TEMPLATE.replace("DEFAULT", "false")), "auto"),
        ("sentencepiece + LLaMA-2, BOS + default system", sp(LLAMA2_TEMPLATE.replace("DEFAULT", "'You are a doctor.'")),
         "auto"),
        ("minimind BPE + its chat template", load_tokenizer(minimind), "auto"),
        ("minimind BPE + alpaca", load_tokenizer(minimind), "alpaca"),
    ]
    print(f"{len(conversations)} conversations (shared SFT + multi-turn files)\n")
    print("| tokenizer + template | ids changed before | ids changed after | straddling | before s | after s |")
    print("|---|---|---|---|---|---|")
    for name, tokenizer, template_name in cases:
        template = select_template(template_name, tokenizer)
        started = time.perf_counter()  # both timings include rendering the conversations
        rendered = [template.render(c) for c in conversations]
        before = piecewise_ids(rendered, tokenizer)
        before_s = time.perf_counter() - started
        reference = encode_texts([r.text for r in rendered], tokenizer)
        started = time.perf_counter()
        mismatched: list[str] = []
        examples, _ = tokenize_conversations(conversations, tokenizer, template, 100_000, mismatched=mismatched)
        after_s = time.perf_counter() - started
        changed_before = sum(a != list(b) for a, b in zip(before, reference))
        changed_after = sum(e.input_ids.tolist() != list(b) for e, b in zip(examples, reference))
        print(f"| {name} ({template.name}) | {changed_before}/{len(reference)} | {changed_after}/{len(reference)} | "
              f"{len(mismatched)} | {before_s:.2f} | {after_s:.2f} |")


if __name__ == "__main__":
    main()
