"""Continuous (iteration-level) batching for the HF engine: one decode loop per model, requests join the
running batch between decode steps and leave it as soon as they finish.

Plain Python + torch (no Serve), so tests and benchmarks drive the same loop the replicas run.

The loop keeps one left-padded KV cache for every running request. A new request is prefilled on its own
(or with the others that arrived during the same step), then its cache rows are left-padded to the running
width and concatenated; a finished request's rows are dropped, and padding columns no row needs any more
are trimmed. Each row keeps its own logits processors (repetition penalty, n-gram ban, temperature, top-k,
top-p), its own random generator (a per-request seed), its stop strings and its token budget, so a request
decodes exactly as it would alone. Beam search (num_beams > 1) does not fit a per-token loop: those
requests run as one `generate` call between two decode steps.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from orchestrator.serve.protocol import GenerationParams, cut_at_stop

log = logging.getLogger(__name__)

Notify = Callable[[Any], None]  # receives token ids (int), then one Completion or one exception


def logits_processors(params: GenerationParams) -> list[Any]:
    """The processors HF `generate` applies for these params, in its order (penalties, then warpers)."""
    from transformers.generation.logits_process import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors: list[Any] = []
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size > 0:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(top_k=params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=params.top_p))
    return processors


@dataclass
class Sequence:
    """One request in the loop: its tokens so far, how it picks the next one, whom to tell."""

    prompt: list[int]
    params: GenerationParams
    notify: Notify
    generated: list[int] = field(default_factory=list)
    processors: list[Any] = field(default_factory=list)
    generator: Optional[torch.Generator] = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.processors = logits_processors(self.params)
        if self.params.do_sample and self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    def next_token(self, logits: torch.Tensor) -> int:
        """Pick the next token from this row's last-position logits (shape [vocab], float32)."""
        scores = logits.unsqueeze(0)
        if self.processors:
            ids = torch.tensor([self.prompt + self.generated], dtype=torch.long)
            for processor in self.processors:
                scores = processor(ids, scores)
        if not self.params.do_sample:
            return int(scores.argmax(dim=-1))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class ContinuousBatcher:
    """The decode loop of one engine (model + tokenizer), on a background thread.

    `submit(prompt_ids, params, notify)` queues a request; `notify` is then called from the loop's thread
    with every new token id and finally with the `Completion` (or the exception that ended it).
    """

    def __init__(self, engine: Any, max_batch_size: int = 8):
        self.engine = engine
        self.max_batch_size = max(1, max_batch_size)
        self._pending: deque[Sequence] = deque()
        self._wake = threading.Condition()
        self._running: list[Sequence] = []
        self._cache: Any = None
        self._mask: Optional[torch.Tensor] = None  # [rows, width]: 1 where the cache holds a real token
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        # transformers renamed `past_key_values` to `cache` (5.2x); vLLM's pin keeps an older one
        base = engine.model.get_base_model() if hasattr(engine.model, "get_base_model") else engine.model  # peft
        self._cache_kwarg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        self.steps = 0  # decode steps run (for tests and logs)
        self.peak_rows = 0  # most requests decoded together

    # -- public
    def submit(self, prompt: list[int], params: GenerationParams, notify: Notify) -> Sequence:
        sequence = Sequence(list(prompt), params, notify)
        with self._wake:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(sequence)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="continuous-batcher", daemon=True)
                self._thread.start()
            self._wake.notify()
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        """Stop decoding a request (a client went away); it leaves the batch at the next step."""
        sequence.cancelled = True

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()

    # -- the loop
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._running and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                arrivals = [self._pending.popleft() for _ in range(min(len(self._pending),
                                                                       self.max_batch_size - len(self._running)))]
            try:
                self._step(arrivals)
            except BaseException as exc:  # a failed step fails the requests in it, not the loop
                log.exception("decode step failed")
                for sequence in {id(s): s for s in self._running + arrivals}.values():
                    sequence.notify(exc)
                self._running, self._cache, self._mask = [], None, None

    def _step(self, arrivals: list[Sequence]) -> None:
        beams = [s for s in arrivals if s.params.num_beams > 1]
        for sequence in beams:
            self._run_beam_search(sequence)
        joining = [s for s in arrivals if s.params.num_beams == 1 and not s.cancelled]
        with torch.no_grad():
            if joining:
                self._admit(joining)
            elif self._running:
                self._decode()
        self.peak_rows = max(self.peak_rows, len(self._running))
        self._retire()

    def _run_beam_search(self, sequence: Sequence) -> None:
        try:
            sequence.notify(self.engine.generate([sequence.prompt], sequence.params)[0])
        except Exception as exc:
            sequence.notify(exc)

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        """One forward pass; `cache` is updated in place."""
        device = self.engine.device
        return self.engine.model(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                                 position_ids=positions.to(device), use_cache=True, **{self._cache_kwarg: cache})

    def _admit(self, joining: list[Sequence]) -> None:
        """Prefill the arrivals together (left-padded), pick their first tokens, merge them into the batch."""
        from transformers import DynamicCache

        width = max(len(s.prompt) for s in joining)
        pad = self.engine.tokenizer.pad_token_id or 0
        ids = torch.full((len(joining), width), pad, dtype=torch.long)
        mask = torch.zeros((len(joining), width), dtype=torch.long)
        for i, s in enumerate(joining):
            ids[i, width - len(s.prompt):] = torch.tensor(s.prompt)
            mask[i, width - len(s.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = self._forward(ids, mask, positions, cache)
        logits = out.logits[:, -1, :].float().cpu()
        for i, s in enumerate(joining):
            self._emit(s, s.next_token(logits[i]))
        self._merge(joining, cache, mask)

    def _merge(self, joining: list[Sequence], cache: Any, mask: torch.Tensor) -> None:
        if not self._running:
            self._running, self._cache, self._mask = list(joining), cache, mask
            return
        old, new = self._mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)], dim=0)
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)], dim=0)
        self._mask = torch.cat([_left_pad(self._mask, width, dim=1), _left_pad(mask, width, dim=1)], dim=0)
        self._running += joining

    def _decode(self) -> None:
        """One token for every running request."""
        last = torch.tensor([[s.generated[-1]] for s in self._running], dtype=torch.long)
        positions = self._mask.sum(dim=1, keepdim=True)  # real tokens so far = the new token's position
        self._mask = torch.cat([self._mask, torch.ones((len(self._running), 1), dtype=torch.long)], dim=1)
        out = self._forward(last, self._mask, positions, self._cache)
        logits = out.logits[:, -1, :].float().cpu()
        for i, s in enumerate(self._running):
            self._emit(s, s.next_token(logits[i]))
        self.steps += 1

    def _emit(self, sequence: Sequence, token: int) -> None:
        sequence.generated.append(token)
        if token not in self.engine.eos_ids:
            sequence.notify(token)

    def _done(self, s: Sequence) -> bool:
        if s.cancelled or s.generated[-1] in self.engine.eos_ids or len(s.generated) >= s.params.max_new_tokens:
            return True
        if s.params.stop:
            text = self.engine.tokenizer.decode(s.generated, skip_special_tokens=True)
            return cut_at_stop(text, s.params.stop)[1]
        return False

    def _retire(self) -> None:
        """Finished requests leave the batch (their cache rows go), then unused padding columns go."""
        keep = []
        for i, s in enumerate(self._running):
            if not self._done(s):
                keep.append(i)
            elif not s.cancelled:
                s.notify(self.engine.finish(list(s.generated), len(s.prompt), s.params))
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask = None, None
            return
        index = torch.tensor(keep, dtype=torch.long)
        self._mask = self._mask[index]
        first = int((self._mask.sum(dim=0) > 0).nonzero()[0])  # leading columns that are padding in every row
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, first:, :]
            layer.values = layer.values[index.to(layer.values.device), :, first:, :]


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros prepended along `dim` up to `width` (cache: [rows, heads, width, head_dim]; mask: [rows, width])."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
