"""Generation parameters with Hugging Face `generate` semantics, shared by serving and evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class GenerationParams:
    """Hugging Face `generate` semantics. Requests with equal params can share a batch."""

    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop: tuple[str, ...] = field(default_factory=tuple)
    seed: Optional[int] = None

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "num_beams": self.num_beams,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # greedy/beam: leave sampling knobs unset so transformers does not warn
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs

    @classmethod
    def from_config(cls, config: Any, seed: Optional[int] = None) -> "GenerationParams":
        """From a `GenerationDefaults` section (serve.defaults, eval.generation); temperature 0 = greedy."""
        do_sample = config.do_sample and config.temperature > 0
        return cls(max_new_tokens=config.max_tokens, do_sample=do_sample, temperature=config.temperature,
                   top_p=config.top_p, top_k=config.top_k, num_beams=config.num_beams,
                   repetition_penalty=config.repetition_penalty, no_repeat_ngram_size=config.no_repeat_ngram_size,
                   stop=tuple(config.stop), seed=seed if do_sample else None)
