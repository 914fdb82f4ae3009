"""One model answering evaluation requests in batches: generation, option log-likelihoods and
document perplexity. Plain Python and torch (no Ray): the Ray Data replicas in `runner` wrap it,
and tests call `score_batch` directly.

Prompts are rendered with the model's chat template (as serving does). A prompt that does not fit
the model's context is cut from the left (its end, the question, is kept) and flagged `truncated`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from orchestrator.config import EvalGenerationConfig
from orchestrator.data.pretrain import encode_texts
from orchestrator.data.templates import encode_prompt, encode_text, split_continuation
from orchestrator.errors import ConfigError, DataError
from orchestrator.evaluation.tasks import GENERATE, LOGLIK, NLL
from orchestrator.serve.engine import AdapterEngine, HFEngine
from orchestrator.model.generation_params import GenerationParams


def generation_params(config: EvalGenerationConfig) -> GenerationParams:
    return GenerationParams.from_config(config, seed=config.seed)


@dataclass(frozen=True)
class ScorerSettings:
    """How a replica scores: generation parameters, perplexity window, sequences per forward pass."""

    generation: GenerationParams
    block_size: int = 512
    batch_size: int = 8


class ModelScorer:
    """A model and its tokenizer, scoring batches of requests."""

    def __init__(self, engine: HFEngine, settings: ScorerSettings):
        self.engine = engine
        self.settings = settings
        self.tokenizer = engine.tokenizer
        self.context_length = engine.context_length
        self.block_size = max(2, min(settings.block_size, self.context_length))

    @classmethod
    def load(cls, model_dir: str, settings: ScorerSettings, tokenizer_dir: Optional[str] = None,
             trust_remote_code: bool = False, base_dir: Optional[str] = None) -> "ModelScorer":
        """A model directory; or, with `base_dir`, an adapter directory (prompt-style stage exports) on that base."""
        if base_dir is None:
            return cls(HFEngine(model_dir, trust_remote_code=trust_remote_code, tokenizer_dir=tokenizer_dir), settings)
        if tokenizer_dir is None:  # the adapter's own tokenizer (checkpoints save one), else the base's
            tokenizer_dir = model_dir if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")) else base_dir
        base = HFEngine(base_dir, trust_remote_code=trust_remote_code, tokenizer_dir=tokenizer_dir)
        return cls(AdapterEngine(base, model_dir), settings)

    # -- prompts
    def _prompt(self, messages: Sequence[Sequence[str]]) -> str:
        return self.engine.chat_prompt([(role, content) for role, content in messages])

    def _prompt_ids(self, messages: Sequence[Sequence[str]]) -> list[int]:
        """The chat's prompt ids, as serving builds them (and stage 2 trained after)."""
        return encode_prompt(self.tokenizer, self.engine.template, [(role, content) for role, content in messages])

    # -- generation
    def generate(self, message_lists: Sequence[Sequence[Sequence[str]]]) -> list[dict[str, Any]]:
        """The answer to each chat (one left-padded batch per `batch_size` chats)."""
        params = self.settings.generation
        budget = self.context_length - params.max_new_tokens
        if budget < 1:
            raise ConfigError(f"eval.generation.max_tokens={params.max_new_tokens} leaves no room for a prompt in "
                              f"the model's context of {self.context_length} tokens")
        prompts, truncated = [], []
        for messages in message_lists:
            ids = self._prompt_ids(messages)
            truncated.append(len(ids) > budget)
            prompts.append(ids[-budget:])
        results = []
        for start in range(0, len(prompts), self.settings.batch_size):
            chunk = prompts[start : start + self.settings.batch_size]
            for i, completion in enumerate(self.engine.generate(chunk, params)):
                results.append({"text": completion.text, "tokens": completion.completion_tokens,
                                "truncated": truncated[start + i]})
        return results

    # -- log-likelihoods
    def _token_logprobs(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """log p(token t | tokens before t) for t = 1 .. n-1 of each sequence (right-padded batches)."""
        model, device = self.engine.model, self.engine.device
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[np.ndarray] = []
        for start in range(0, len(sequences), self.settings.batch_size):
            chunk = sequences[start : start + self.settings.batch_size]
            longest = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), longest), dtype=torch.long)
            for i, seq in enumerate(chunk):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            with torch.no_grad():
                # prompt-tuning adapters put virtual tokens first: keep the positions of the real ones
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -longest:]
            for i, seq in enumerate(chunk):  # one row at a time: a float32 copy of all logits can be large
                row = torch.log_softmax(logits[i, : len(seq) - 1].float(), dim=-1)
                target = ids[i, 1 : len(seq)].to(device)
                out.append(row.gather(-1, target[:, None]).squeeze(-1).cpu().numpy())
        return out

    def loglikelihoods(self, messages: Sequence[Sequence[str]], continuations: Sequence[str]) -> dict[str, Any]:
        """Summed log-likelihood (and token count) of each continuation after the chat prompt."""
        prompt = self._prompt(messages)
        prompt_ids = encode_text(self.tokenizer, prompt)  # = self._prompt_ids(messages), rendered once
        sequences, spans, truncated = [], [], False
        for text in continuations:
            # prompt + option as one text, as the model would see the answer written after the prompt
            context, cont = split_continuation(self.tokenizer, prompt, prompt_ids, text)
            if not cont:
                raise DataError(f"option {text!r} has no tokens")
            room = self.context_length - len(cont)
            if room < 1:
                raise DataError(f"option {text[:40]!r}... alone fills the model's context of {self.context_length}")
            ctx = context[-room:]
            truncated = truncated or len(ctx) < len(context)
            sequences.append(ctx + cont)
            spans.append((len(ctx), len(cont)))
        logprobs = self._token_logprobs(sequences)
        # logprobs[t - 1] scores token t: the continuation's tokens are t = len(ctx) .. end
        logliks = [float(lp[n_ctx - 1 : n_ctx - 1 + n_cont].sum()) for lp, (n_ctx, n_cont) in zip(logprobs, spans)]
        return {"logliks": logliks, "tokens": [n for _, n in spans], "truncated": truncated}

    def document_nll(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """Negative log-likelihood of each document (EOS appended, as stage 1 trains), scored in windows of
        block_size tokens that overlap by one, so every token after the first is predicted exactly once."""
        eos = self.tokenizer.eos_token_id
        windows, owner = [], []
        for index, ids in enumerate(encode_texts(list(texts), self.tokenizer)):
            ids = list(ids) + ([eos] if eos is not None else [])
            for start in range(0, max(len(ids) - 1, 1), self.block_size - 1):
                window = ids[start : start + self.block_size]
                if len(window) > 1:
                    windows.append(window)
                    owner.append(index)
        results = [{"nll": 0.0, "tokens": 0} for _ in texts]
        for index, logprobs in zip(owner, self._token_logprobs(windows) if windows else []):
            results[index]["nll"] -= float(logprobs.sum())
            results[index]["tokens"] += len(logprobs)
        return results


def score_batch(scorer: ModelScorer, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Answer a batch of request rows ({key, task, payload}); returns {key, result} rows (result as JSON)."""
    payloads = [json.loads(row["payload"]) for row in rows]
    results: list[Optional[dict[str, Any]]] = [None] * len(rows)
    generate = [i for i, row in enumerate(rows) if row["task"] == GENERATE]
    for i, answer in zip(generate, scorer.generate([payloads[i]["messages"] for i in generate])):
        results[i] = answer
    nll = [i for i, row in enumerate(rows) if row["task"] == NLL]
    for i, scored in zip(nll, scorer.document_nll([payloads[i]["text"] for i in nll])):
        results[i] = scored
    for i, row in enumerate(rows):
        if row["task"] == LOGLIK:
            results[i] = scorer.loglikelihoods(payloads[i]["messages"], payloads[i]["continuations"])
        elif results[i] is None:
            raise ValueError(f"request {row['key']}: unknown task {row['task']!r}")
    return [{"key": row["key"], "result": json.dumps(result, ensure_ascii=False)} for row, result in zip(rows, results)]
