"""The model a worker trains: base weights (or a checkpoint's), vocabulary, memory levers, PEFT method."""

from __future__ import annotations

import logging
import tempfile
from typing import Any, Optional

from orchestrator import storage
from orchestrator.config import ADAPTER_METHODS, ModelConfig, TrainConfig
from orchestrator.model.loading import align_vocab, load_causal_lm, resolve_dtype
from orchestrator.model.peft import apply_method

log = logging.getLogger(__name__)


def build_training_model(model_config: ModelConfig, train: TrainConfig, model_dir: str, tokenizer: Any,
                         tokenizer_dir: str, precision: str, total_steps: int,
                         checkpoint_model_dir: Optional[str] = None) -> Any:
    """Load the base (or, with `checkpoint_model_dir`, a checkpoint's saved weights) and apply the method.

    `checkpoint_model_dir` is a checkpoint's `model/` directory: full weights for full/freeze, the
    trainable adapter for peft methods (loaded on top of the base in `model_dir`). Without one,
    `model.resume_adapter` continues the last of `model.init_adapters` instead of a new adapter (the
    driver left it set only for the stage it applies to, see orchestrator.train.stage_base).
    """
    is_adapter = train.method in ADAPTER_METHODS
    weights_dir = checkpoint_model_dir if checkpoint_model_dir is not None and not is_adapter else model_dir
    model = load_causal_lm(weights_dir, resolve_dtype(model_config.dtype, precision),
                           model_config.attn_implementation, model_config.trust_remote_code)
    align_vocab(model, tokenizer)
    partition_new_parameters(model)
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        if is_adapter:
            model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if is_adapter and checkpoint_model_dir is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, checkpoint_model_dir, is_trainable=True)
    if model_config.resume_adapter:
        return load_trainable_adapter(model, model_config.init_adapters[-1])
    return apply_method(model, train, total_steps, tokenizer_dir)


def zero3_partitioned_loading(ds_config: dict[str, Any], use_gpu: bool) -> Optional[Any]:
    """Under ZeRO-3, an object that makes transformers build the model inside `deepspeed.zero.Init`.

    While it lives, `from_pretrained` creates every parameter already partitioned across the ranks
    (no rank materialises the whole model; DeepSpeed then skips its whole-module move to the device),
    and embedding resizes gather and re-partition. Keep the returned object alive as long as the
    engine: transformers holds only a weak reference to it. None for ZeRO 0-2 (whole loading).
    """
    if ds_config.get("zero_optimization", {}).get("stage") != 3:
        return None
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    # zero.Init reads the world size from DeepSpeed's communicator: bind it to the process group Ray set up.
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    return HfDeepSpeedConfig(ds_config)


def partition_new_parameters(model: Any) -> None:
    """Under partitioned ZeRO-3 loading, partition what was created whole after loading (grown embeddings:
    transformers builds them outside zero.Init), so no rank keeps a whole embedding until initialize."""
    from transformers.integrations import deepspeed_config, is_deepspeed_zero3_enabled

    if not is_deepspeed_zero3_enabled():
        return
    import deepspeed

    deepspeed.zero.Init(module=model, config_dict_or_path=deepspeed_config())


def load_trainable_adapter(model: Any, adapter_uri: str) -> Any:
    """`model` wrapped with the adapter at `adapter_uri` (directory or URI), its weights trainable."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory(prefix="resume-adapter-") as tmp:
        model = PeftModel.from_pretrained(model, storage.download_dir(adapter_uri, tmp), is_trainable=True)
    log.info("continuing to train adapter %s", adapter_uri)
    return model


def adalora_update(module: Any, global_step: int, zero_stage: int) -> None:
    """AdaLoRA's importance update and rank reallocation; every rank calls it after backward, before the step.

    peft reads `param.grad` of the adapter matrices. ZeRO 1/2 keep reduced gradients in their own
    partitioned buffers (param.grad is None), so the full gradients are put in place for the call.
    """
    if zero_stage == 0:
        module.base_model.update_and_allocate(global_step)
        return
    from deepspeed.utils import safe_get_full_grad

    adapter = [param for name, param in module.named_parameters() if "lora_" in name and param.requires_grad]
    for param in adapter:
        param.grad = safe_get_full_grad(param)
    try:
        module.base_model.update_and_allocate(global_step)
    finally:
        for param in adapter:
            param.grad = None
