"""Hugging Face models behind the API: `generate` for one left-padded batch (beam search, offline use),
`continuous()` for the serving decode loop (orchestrator/serve/continuous.py), text deltas for streaming,
stop strings, usage counts. Plain Python (no Serve), so it is tested and benchmarked
in-process against the very same code the deployment runs."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Optional

import torch

from orchestrator.data.templates import encode_prompt, encode_text, prompt_for_generation, select_template
from orchestrator.serve.continuous import ContinuousBatcher
from orchestrator.serve.protocol import GenerationParams, check_context, cut_at_stop, stop_prefix_hold

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


class HFEngine:
    """One model + tokenizer; `generate` for a batch, `continuous()` for requests that come and go."""

    def __init__(self, model_dir: str, trust_remote_code: bool = False, dtype: Optional[torch.dtype] = None,
                 device: Optional[str] = None, tokenizer_dir: Optional[str] = None):
        from transformers import AutoModelForCausalLM

        from orchestrator.model.embeddings import check_tokenizer_fits
        from orchestrator.model.loading import load_tokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32),
            trust_remote_code=trust_remote_code,
        ).to(self.device)
        self.model.eval()
        self.tokenizer = load_tokenizer(tokenizer_dir or model_dir)
        check_tokenizer_fits(self.model, self.tokenizer, tokenizer_dir or model_dir)
        self.tokenizer.padding_side = "left"
        self.template = select_template("auto", self.tokenizer)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None} or {self.tokenizer.eos_token_id}
        self._lock = threading.Lock()  # one generate at a time per engine (torch threads are shared)

    # -- prompts
    def chat_prompt(self, messages: list[tuple[str, str]]) -> str:
        return prompt_for_generation(self.template, messages)

    def encode(self, text: str, params: GenerationParams) -> list[int]:
        """Prompt token ids of a raw completion prompt; 400 if prompt + max_tokens exceed the context."""
        ids = encode_text(self.tokenizer, text)
        check_context(len(ids), params, self.context_length)
        return ids

    def encode_chat(self, messages: list[tuple[str, str]], params: GenerationParams) -> list[int]:
        """Prompt token ids of a chat, built as stage 2 trained them (`encode_prompt`); 400 when too long."""
        ids = encode_prompt(self.tokenizer, self.template, messages)
        check_context(len(ids), params, self.context_length)
        return ids

    # -- generation
    def _inputs(self, batch: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(batch), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, ids in enumerate(batch):  # left padding: generation continues at the right edge
            input_ids[i, longest - len(ids):] = torch.tensor(ids)
            mask[i, longest - len(ids):] = 1
        return {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}

    def _kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kwargs = params.generate_kwargs()
        kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        kwargs["eos_token_id"] = sorted(self.eos_ids)
        if params.stop:
            kwargs.update(stop_strings=list(params.stop), tokenizer=self.tokenizer)
        return kwargs

    def finish(self, new_ids: list[int], prompt_tokens: int, params: GenerationParams) -> Completion:
        ended = False
        for i, token in enumerate(new_ids):
            if token in self.eos_ids:
                new_ids, ended = new_ids[:i], True
                break
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        text, stopped = cut_at_stop(text, params.stop)
        tokens = len(new_ids) if not stopped else len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        reason = "stop" if ended or stopped else "length"
        return Completion(text, reason, prompt_tokens, tokens)

    def generate(self, prompts: list[list[int]], params: GenerationParams) -> list[Completion]:
        """Completions for prompts that share `params` (one left-padded batch)."""
        inputs = self._inputs(prompts)
        with self._lock, torch.no_grad():
            if params.seed is not None:
                torch.manual_seed(params.seed)
            output = self.model.generate(**inputs, **self._kwargs(params))
        width = inputs["input_ids"].shape[1]
        return [self.finish(output[i, width:].tolist(), len(p), params) for i, p in enumerate(prompts)]

    def continuous(self, max_batch_size: int = 8) -> "ContinuousBatcher":
        """This engine's continuous-batching decode loop (created on first use, one per engine)."""
        if getattr(self, "_batcher", None) is None:
            self._batcher = ContinuousBatcher(self, max_batch_size)
        return self._batcher


class TextDeltas:
    """Token ids in, text deltas out: holds back an incomplete UTF-8 character and a possible stop-string
    prefix, cuts at a stop string. The deltas concatenate to exactly `HFEngine.finish`'s text."""

    def __init__(self, engine: HFEngine, params: GenerationParams):
        self.engine, self.params = engine, params
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text this token makes safe to send ("" when nothing is)."""
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.engine.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut, self.stopped = cut_at_stop(text, self.params.stop)
        ready = cut if self.stopped else text[: len(text) - stop_prefix_hold(text, self.params.stop)].rstrip("\ufffd")
        if len(ready) <= len(self.sent):
            return ""
        delta, self.sent = ready[len(self.sent):], ready
        return delta

    def last(self, finished: Completion) -> str:
        """What is left to send once the request has finished."""
        if len(finished.text) > len(self.sent) and finished.text.startswith(self.sent):
            return finished.text[len(self.sent):]
        return ""


class AdapterEngine(HFEngine):
    """The base engine's model with a LoRA adapter on top (a copy: the base stays unchanged)."""

    def __init__(self, base: HFEngine, adapter_dir: str):
        import copy

        from peft import PeftModel

        self.device = base.device
        self.model = PeftModel.from_pretrained(copy.deepcopy(base.model), adapter_dir).to(self.device)
        self.model.eval()
        self.tokenizer = base.tokenizer
        self.template = base.template
        self.context_length = base.context_length
        self.eos_ids = base.eos_ids
        self._lock = threading.Lock()
