"""The model a stage starts from, prepared once before any worker starts (the driver decides; the heavy part,
loading, merging and growing the model, runs as a Ray task with `distributed.model_tasks` resources).

Usually that is the configured base (or stage 1's merged model) as it is. Two things derive a new
base, written to `<storage_path>/<run_name>/<stage>-base/`:

* `model.init_adapters`: the adapters are merged into the base in order (all but the last with
  `model.resume_adapter`, whose last adapter the workers keep training), so the stage trains a new
  adapter on base + earlier adapters; under ZeRO-3 that is an ordinary model to partition.
* an extended tokenizer (more tokens than the base's own): embeddings and LM head grow to the
  tokenizer size padded to a multiple of 64, new rows start as the mean of their base pieces'
  rows (orchestrator.model.embeddings), and LoRA/AdaLoRA train `embed_tokens` and `lm_head` in full
  next to the adapter (added to `lora.modules_to_save` automatically, with a log line).

`derived_base.json` is written last and records what the base was derived from: a rerun or a
resumed run of the stage reuses the derived base, and a rerun that asks for a different one
(other adapters, another tokenizer) is refused instead of training on top of the wrong weights.
The workers load the derived base like any base, so their `align_vocab` finds nothing to do.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from orchestrator import storage
from orchestrator.config import PROMPT_METHODS, PipelineConfig
from orchestrator.errors import CheckpointError, ConfigError
from orchestrator.layout import RunLayout
from orchestrator.model.embeddings import PAD_TO_MULTIPLE_OF, check_extends, check_tokenizer_fits, extend_embeddings
from orchestrator.model.loading import WEIGHT_SUFFIXES, fetch_tokenizer, load_causal_lm, load_tokenizer, resolve_dtype
from orchestrator.runtime import run_model_task, where_this_runs

log = logging.getLogger(__name__)

DERIVED_BASE_RECORD = "derived_base.json"
ADAPTER_METHOD_OF = {"LORA": "lora", "ADALORA": "adalora", "PROMPT_TUNING": "prompt_tuning",
                     "P_TUNING": "p_tuning", "PREFIX_TUNING": "prefix_tuning"}


@dataclass(frozen=True)
class StageBase:
    """Where the stage's workers load their base from, and the stage's effective config."""

    model_uri: str
    config: PipelineConfig
    lineage: dict[str, Any]


def configured_base_uri(config: PipelineConfig, layout: RunLayout) -> str:
    """The base a run starts from: `model.base`, or the tiny base under the run."""
    return storage.join(config.model.base) if config.model.base is not None else layout.tiny_base


def prepare_stage_base(config: PipelineConfig, stage: str, base_model: str, tokenizer_uri: str,
                       layout: RunLayout) -> StageBase:
    """The stage's base and effective config (see the module docstring).

    `model.init_adapters` apply to the stage that starts from the configured base; a stage that
    starts from stage 1's model finds them merged in already (its `resume_adapter` is switched off).
    """
    first_stage = base_model == configured_base_uri(config, layout)
    if config.model.init_adapters and not first_stage:
        log.info("%s starts from %s, which already holds model.init_adapters; nothing is merged or resumed here",
                 stage, base_model)
    resume = config.model.resume_adapter and first_stage
    if resume != config.model.resume_adapter:
        config = config.model_copy(deep=True)
        config.model.resume_adapter = resume
    adapters = list(config.model.init_adapters) if first_stage else []
    if resume:
        check_resumable(adapters[-1], config.stage(stage).train.method)
    to_merge = adapters[:-1] if resume else adapters
    with tempfile.TemporaryDirectory(prefix="stage-base-") as tmp:
        tokenizer = fetch_tokenizer(tokenizer_uri, os.path.join(tmp, "tokenizer"))
        base_tokenizer = _base_tokenizer(base_model, tokenizer_uri, len(tokenizer), os.path.join(tmp, "base-tokenizer"))
        grows = base_tokenizer is not None and len(tokenizer) > len(base_tokenizer)
        if not to_merge and not grows:
            return StageBase(base_model, config, {})
        method = config.stage(stage).train.method
        if grows and not resume and method in PROMPT_METHODS:
            raise ConfigError(f"{stage}.train.method={method} trains only virtual tokens, so the embeddings of the "
                              f"{len(tokenizer) - len(base_tokenizer)} new tokens would never leave their initial "
                              "values; use lora or adalora (they train embed_tokens and lm_head alongside), freeze "
                              "or full")
        target = layout.stage_base(stage)
        recipe = {"base": base_model, "init_adapters": to_merge, "tokenizer": tokenizer_uri,
                  "tokenizer_tokens": len(tokenizer), "pad_to_multiple_of": PAD_TO_MULTIPLE_OF}
        record = read_derived_record(target)
        if record is None:  # a Ray task: the merge and the grown model need the whole model's memory
            record = run_model_task(derive_base, config, stage, base_model, to_merge, tokenizer, base_tokenizer,
                                    recipe, target, resources=config.distributed.model_tasks)
        elif record["recipe"] != recipe:
            raise ConfigError(
                f"{target} was derived from {json.dumps(record['recipe'])}, but this run asks for "
                f"{json.dumps(recipe)}; the stage's checkpoints were trained on the first. Use a new run_name "
                "(or delete the stage's directory and its derived base to start over)"
            )
        else:
            log.info("%s: reusing the derived base %s", stage, target)
    if resume:
        check_resumed_adapter_rows(adapters[-1], record)
    config = train_new_rows(config, stage, record)
    return StageBase(target, config, {"stage_base": {"uri": target, **record}})


def derive_base(config: PipelineConfig, stage: str, base_model: str, to_merge: list[str], tokenizer: Any,
                base_tokenizer: Optional[Any], recipe: dict[str, Any], target: str) -> dict[str, Any]:
    """Merge `to_merge` into the base, grow the vocabulary, save to `target` with the record written last."""
    with tempfile.TemporaryDirectory(prefix="derive-base-") as tmp:
        return _derive_base(config, stage, base_model, to_merge, tokenizer, base_tokenizer, recipe, target, tmp)


def _derive_base(config: PipelineConfig, stage: str, base_model: str, to_merge: list[str], tokenizer: Any,
                 base_tokenizer: Optional[Any], recipe: dict[str, Any], target: str, tmp: str) -> dict[str, Any]:
    from orchestrator.model.peft import merge_adapters

    dtype = resolve_dtype(config.model.dtype, config.stage(stage).train.precision)
    base_dir = storage.download_dir(base_model, os.path.join(tmp, "base"))
    base_rows = _config_rows(base_dir)
    merge_diff = None
    known = len(base_tokenizer) if base_tokenizer is not None else len(tokenizer)
    if to_merge:
        adapter_dirs = [storage.download_dir(uri, os.path.join(tmp, f"adapter{i}")) for i, uri in enumerate(to_merge)]
        log.info("%s: merging %d adapter(s) into %s: %s", stage, len(to_merge), base_model, ", ".join(to_merge))
        model, merge_diff = merge_adapters(base_dir, adapter_dirs, dtype)
        merged_rows = model.get_input_embeddings().weight.shape[0]
        if merged_rows > base_rows:  # an adapter brought trained rows for an extended vocabulary
            grown_by = next((d for d in reversed(adapter_dirs)
                             if os.path.exists(os.path.join(d, "tokenizer_config.json"))), None)
            if grown_by is not None:
                check_extends(load_tokenizer(grown_by), tokenizer, recipe["tokenizer"])
            known = max(known, min(merged_rows, len(tokenizer)))
    else:
        model = load_causal_lm(base_dir, dtype, config.model.attn_implementation, config.model.trust_remote_code)
    extension = None
    if len(tokenizer) > known:
        check_extends(base_tokenizer, tokenizer, recipe["tokenizer"])
        extension = extend_embeddings(model, base_tokenizer, tokenizer, first_new=known).as_dict()
    check_tokenizer_fits(model, tokenizer, recipe["tokenizer"])
    names = {id(module): name for name, module in model.named_modules()}
    output = model.get_output_embeddings()
    record = {
        "recipe": recipe,
        "merge_max_abs_logit_diff": merge_diff,
        "vocabulary": extension,
        "embedding_rows": model.get_input_embeddings().weight.shape[0],
        "embedding_modules": [names[id(model.get_input_embeddings())]] + ([names[id(output)]] if output else []),
        "derived_on": where_this_runs(),
    }
    out_dir = os.path.join(tmp, "derived")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    storage.upload_dir(out_dir, target)
    storage.write_bytes(storage.join(target, DERIVED_BASE_RECORD), json.dumps(record, indent=1).encode("utf-8"))
    log.info("%s: derived base written to %s (%d embedding rows)", stage, target, record["embedding_rows"])
    return record


def read_derived_record(target: str) -> Optional[dict[str, Any]]:
    """The record of a complete derived base at `target`, or None (absent, or cut off before the record)."""
    path = storage.join(target, DERIVED_BASE_RECORD)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def train_new_rows(config: PipelineConfig, stage: str, record: dict[str, Any]) -> PipelineConfig:
    """The stage's config with the grown embedding and LM head trainable under its method (full trains them
    anyway; prompt methods were refused before deriving)."""
    extension = record.get("vocabulary")
    train = config.stage(stage).train
    if not extension or config.model.resume_adapter:
        return config  # a resumed adapter brings its own trained rows (checked by check_resumed_adapter_rows)
    new_tokens = extension["tokens"] - extension["base_tokens"]
    modules = record["embedding_modules"]
    if train.method in ("lora", "adalora"):
        short = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in modules))
        missing = [name for name in short if name not in train.lora.modules_to_save]
        if missing:
            log.info("%s: the vocabulary grew by %d tokens, so %s train in full next to the adapter "
                     "(added to %s.train.lora.modules_to_save)", stage, new_tokens, " and ".join(missing), stage)
            config = config.model_copy(deep=True)
            lora = config.stage(stage).train.lora
            lora.modules_to_save = [*lora.modules_to_save, *missing]
    elif train.method == "freeze":
        missing = [name for name in modules if name not in train.freeze.extra_modules]
        if missing:
            log.info("%s: the vocabulary grew by %d tokens, so %s train too (added to %s.train.freeze.extra_modules)",
                     stage, new_tokens, " and ".join(missing), stage)
            config = config.model_copy(deep=True)
            freeze = config.stage(stage).train.freeze
            freeze.extra_modules = [*freeze.extra_modules, *missing]
    return config


def check_resumable(adapter_uri: str, method: str) -> None:
    """`model.resume_adapter` continues an adapter of the stage's own method (not AdaLoRA: its rank
    schedule ended with the run that trained it)."""
    config_uri = storage.join(adapter_uri, "adapter_config.json")
    if not storage.exists(config_uri):
        raise CheckpointError(f"{adapter_uri}: not a peft adapter directory (no adapter_config.json)")
    peft_type = str(json.loads(storage.read_bytes(config_uri)).get("peft_type", "")).upper()
    kind = ADAPTER_METHOD_OF.get(peft_type, peft_type.lower())
    if kind == "adalora":
        raise ConfigError(f"model.resume_adapter: {adapter_uri} is an AdaLoRA adapter, whose rank schedule cannot be "
                          "continued; merge it instead (model.resume_adapter: false) and train a new adapter")
    if kind != method:
        raise ConfigError(f"model.resume_adapter: {adapter_uri} is a {kind} adapter but the stage trains with "
                          f"method {method}; set the stage's train.method to {kind}, or merge it "
                          "(model.resume_adapter: false)")


def adapter_embedding_rows(adapter_uri: str) -> Optional[int]:
    """Rows of the embedding / LM head an adapter trains in full (modules_to_save), or None."""
    raw = storage.read_bytes(storage.join(adapter_uri, "adapter_model.safetensors"))
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    rows = {entry["shape"][0] for key, entry in header.items()
            if key.endswith(("embed_tokens.weight", "lm_head.weight"))}
    return max(rows) if rows else None


def check_resumed_adapter_rows(adapter_uri: str, record: dict[str, Any]) -> None:
    """A continued adapter must fit the derived base's vocabulary (and train the new rows, if any)."""
    rows = adapter_embedding_rows(adapter_uri)
    expected = record["embedding_rows"]
    if rows is not None and rows != expected:
        raise ConfigError(f"model.resume_adapter: {adapter_uri} trains embeddings of {rows} rows, but the stage's base "
                          f"has {expected}; continue it with the tokenizer it was trained with")
    if rows is None and record.get("vocabulary"):
        raise ConfigError(f"model.resume_adapter: {adapter_uri} does not train the embeddings, so the tokenizer's new "
                          "tokens could not be learned; extend the vocabulary with a new adapter "
                          "(model.resume_adapter: false)")


def _base_tokenizer(base_model: str, tokenizer_uri: str, tokens: int, local_dir: str) -> Optional[Any]:
    """The tokenizer saved with the base model (only its small files are fetched), or None when the stage
    uses the base's own tokenizer or the base has none (then the stage's `tokens` must fit its rows)."""
    if tokenizer_uri == base_model:
        return None
    names = [n for n in storage.list_files(base_model) if "/" not in n and not n.endswith(WEIGHT_SUFFIXES)]
    if not any(n.startswith("tokenizer") for n in names):
        _check_rows_without_tokenizer(base_model, tokens)
        return None
    for name in names:
        storage.write_bytes(os.path.join(local_dir, name), storage.read_bytes(storage.join(base_model, name)))
    return load_tokenizer(local_dir)


def _config_rows(model_dir: str) -> int:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    return int(config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0)


def _check_rows_without_tokenizer(base_model: str, tokens: int) -> None:
    config_uri = storage.join(base_model, "config.json")
    if not storage.exists(config_uri):
        return
    rows = int(json.loads(storage.read_bytes(config_uri)).get("vocab_size") or 0)
    if tokens > rows:
        raise ConfigError(f"{base_model} has no tokenizer to split the {tokens - rows} new tokens with (its embedding "
                          f"has {rows} rows, the stage's tokenizer {tokens} tokens); save the base model's tokenizer "
                          "into its directory so the new rows can start from their pieces")
