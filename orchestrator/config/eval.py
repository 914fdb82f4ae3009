"""Config sections: the post-training evaluation (sets, generation, probes)."""

from __future__ import annotations

import re
from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from orchestrator.config.base import Section
from orchestrator.config.data import DataSourceConfig, RecordShape, template_keys


def _template_names_a_key(value: Optional[str]) -> Optional[str]:
    if value is not None and not template_keys(value):
        raise ValueError(f"{value!r} names no record key; write e.g. \"{{question}}\"")
    return value
from orchestrator.config.serve import GenerationDefaults


class EvalGenerationConfig(GenerationDefaults):
    """Generation parameters of the post-training evaluation (Hugging Face semantics; greedy by default)."""

    do_sample: bool = Field(False, description="Sample (true) or decode greedily (false, reproducible).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (do_sample only).")
    seed: Optional[int] = Field(0, description="Seed set before each generation batch (do_sample only).")


class QASetConfig(RecordShape):
    """A question/answer set scored on generated answers (character F1, ROUGE-L, exact match). The shape keys
    (records, keyed_by, unwrap, transform) are those of a training source."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name in the report.")
    path: str = Field(..., description="File, directory, glob or URI (JSON, JSONL or Parquet).")
    format: Literal["auto", "qa", "clinical_cases", "alpaca", "multiturn", "sharegpt"] = Field(
        "auto",
        description="qa: {question, answer}; clinical_cases: {description, QA_pairs: [{question, answer}]}, one "
        "item per pair, asked with the case description; alpaca / multiturn / sharegpt: the last assistant turn is "
        "the reference, earlier turns are the prompt. auto: guessed from the fields of each record.",
    )
    fields: dict[str, str] = Field(
        default_factory=dict,
        description="Map canonical field names to the names in your records, e.g. {question: 问, answer: 答}. "
        "Canonical names: question, answer, description, qa_pairs, and those of the training formats.",
    )
    prompt_template: Optional[str] = Field(
        None, description="The question built from record keys, e.g. \"{QUESTION}\\n\\nContext: {CONTEXTS}\" "
        "(lists are joined with newlines); the record is then read as {question, answer}.",
    )
    response_template: Optional[str] = Field(None, description="The reference answer built from record keys, "
                                             "e.g. \"{final_decision}\".")
    system_template: Optional[str] = Field(None, description="A system message built from record keys.")
    max_records: Optional[int] = Field(None, gt=0, description="Evaluate at most this many questions (first N).")

    @field_validator("prompt_template", "response_template", "system_template")
    @classmethod
    def _template_parses(cls, value: Optional[str]) -> Optional[str]:
        return _template_names_a_key(value)


class MultipleChoiceSetConfig(RecordShape):
    """A multiple-choice set scored by the log-likelihood of each option (the highest one is the model's pick).
    The shape keys (records, keyed_by, unwrap, transform) are those of a training source."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Name in the report.")
    path: str = Field(..., description="CSV, JSON or JSONL file, directory, glob or URI.")
    question_field: str = Field("question", description="Column holding the question.")
    prompt_template: Optional[str] = Field(
        None, description="Instead of question_field: the question built from record keys, e.g. "
        "\"{context}\\n{question}\".",
    )
    option_fields: list[str] = Field(
        default_factory=lambda: ["A", "B", "C", "D"],
        description="Columns holding the options, in order; they are labelled A, B, C, ... in that order.",
    )
    options_field: Optional[str] = Field(
        None, description="Instead of option_fields: one field holding a list of options (labelled A, B, ...) or a "
        "{label: option} mapping (JSON sets).",
    )
    answer_field: str = Field("answer", description="Column holding the correct option's label (e.g. B).")
    scoring: Literal["letter", "option_text"] = Field(
        "letter",
        description="letter: log-likelihood of the option's label after the question with all options listed; "
        "option_text: log-likelihood per token of the option's text after the question.",
    )
    instruction: Optional[str] = Field(
        None, description="A line put before every question, e.g. '以下是单项选择题，请直接给出正确答案的选项。'"
    )
    max_records: Optional[int] = Field(None, gt=0, description="Evaluate at most this many questions (first N).")

    @field_validator("prompt_template")
    @classmethod
    def _template_parses(cls, value: Optional[str]) -> Optional[str]:
        return _template_names_a_key(value)

    @model_validator(mode="after")
    def _enough_options(self) -> "MultipleChoiceSetConfig":
        if self.options_field is None and len(self.option_fields) < 2:
            raise ValueError("option_fields: list at least two option columns (or set options_field)")
        return self


DEFAULT_REFUSAL_PATTERNS = [
    r"不知道", r"不清楚", r"不确定", r"无法(回答|确定|提供|判断|给出)", r"不能(回答|确定|提供)",
    r"没有(相关|足够|可靠)的?(信息|资料|数据|证据)", r"(抱歉|对不起)",
    r"\bI (do not|don't) know\b", r"\b(cannot|can't|unable to) (answer|say|determine|provide)\b",
    r"\bnot sure\b", r"\bno (reliable )?information\b",
]


class HonestyConfig(Section):
    """Questions whose answers are not in the training data; the model should decline them."""

    questions: list[str] = Field(default_factory=list, description="Probe questions, inline.")
    path: Optional[str] = Field(
        None, description="More probes: a .txt file (one question a line) or JSON/JSONL records (see `question_field`)."
    )
    question_field: str = Field("question", description="Field holding the question in JSON/JSONL probe files.")
    refusal_patterns: list[str] = Field(
        default_factory=lambda: list(DEFAULT_REFUSAL_PATTERNS),
        description="Regular expressions (searched, case-insensitive); an answer matching any of them is a "
        "refusal. The default lists common Chinese and English ways of declining.",
    )
    max_records: Optional[int] = Field(None, gt=0, description="Use at most this many probes (first N).")

    @model_validator(mode="after")
    def _patterns_compile(self) -> "HonestyConfig":
        if not self.questions and self.path is None:
            raise ValueError("no probes: list `questions` or set `path`")
        if not self.refusal_patterns:
            raise ValueError("refusal_patterns: list at least one regular expression")
        for i, pattern in enumerate(self.refusal_patterns):
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"refusal_patterns[{i}] {pattern!r} is not a valid regular expression: {exc}")
        return self


class PerplexityConfig(Section):
    """Perplexity on held-out documents."""

    sources: list[DataSourceConfig] = Field(
        default_factory=list, description="Documents to score; empty = the pretrain stage's held-out documents "
        "(its eval_sources, or the same eval_split the stage trained with).",
    )
    block_size: int = Field(
        512, ge=8, description="Tokens per scored window; longer documents are scored in consecutive windows "
        "(capped at the model's context length).",
    )
    max_documents: Optional[int] = Field(None, gt=0, description="Score at most this many documents.")


class PreferenceEvalConfig(Section):
    """Preference accuracy: the share of held-out pairs whose chosen answer a model finds likelier (mean log-prob
    per token after the chat prompt) — the SFT and the preference model side by side."""

    sources: list[DataSourceConfig] = Field(
        default_factory=list, description="Preference pairs to score (any stage-3 record shape); empty = the "
        "preference stage's held-out pairs (its eval_sources, or the same eval_split the stage trained with).",
    )
    max_records: Optional[int] = Field(None, gt=0, description="Score at most this many pairs.")


class EvalConfig(Section):
    """Evaluation during training, and of each stage's final model after training (see orchestrator.evaluation)."""

    at_start: bool = Field(True, description="Also evaluate before the first step (the baseline in the logs).")
    max_batches: Optional[int] = Field(None, gt=0, description="Cap on evaluation batches per epoch.")
    micro_batch_size: Optional[int] = Field(None, gt=0, description="Evaluation batch size; default = training's.")
    prompts: list[str] = Field(
        default_factory=list, description="Prompts answered with the final model of the pipeline (smoke check)."
    )
    max_new_tokens: int = Field(48, gt=0, description="Tokens generated per prompt.")
    after_training: bool = Field(
        False, description="After the pipeline's stages, evaluate the base model and every stage's final model on "
        "the sets below and write the report (Markdown, JSON, loss plots) to <storage_path>/<run_name>/eval/.",
    )
    perplexity: Optional[PerplexityConfig] = Field(None, description="Perplexity on held-out documents.")
    preference: Optional[PreferenceEvalConfig] = Field(
        None, description="Preference accuracy on held-out pairs (chosen likelier than rejected)."
    )
    qa: list[QASetConfig] = Field(default_factory=list, description="Question/answer sets (generated answers).")
    multiple_choice: list[MultipleChoiceSetConfig] = Field(
        default_factory=list, description="Multiple-choice sets (option log-likelihoods)."
    )
    honesty: Optional[HonestyConfig] = Field(None, description="Unanswerable probes the model should decline.")
    generation: EvalGenerationConfig = Field(
        default_factory=EvalGenerationConfig, description="Generation parameters of QA and honesty answers."
    )
    samples: int = Field(3, ge=0, description="Generated answers per set shown side by side in the report.")
    replicas: int = Field(1, ge=1, description="Model replicas scoring in parallel (Ray Data actors).")
    num_cpus_per_replica: float = Field(1, gt=0, description="CPUs per replica (also its torch threads).")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs per replica.")
    batch_size: int = Field(8, ge=1, description="Requests per model call (generation batch, Ray Data batch).")

    @model_validator(mode="after")
    def _unique_set_names(self) -> "EvalConfig":
        names = [s.name for s in self.qa] + [s.name for s in self.multiple_choice]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"qa / multiple_choice: set names must be unique; repeated: {', '.join(repeated)}")
        return self
