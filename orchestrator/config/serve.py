"""Config sections: the OpenAI-compatible HTTP service and its generation defaults."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from orchestrator.config.base import Section


class GenerationDefaults(Section):
    """Generation parameters used when a request leaves them out (Hugging Face semantics)."""

    max_tokens: int = Field(128, gt=0, description="New tokens per answer.")
    temperature: float = Field(1.0, ge=0, le=2, description="0 = greedy.")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0 = off).")
    do_sample: bool = Field(True, description="Sample (true) or decode greedily (false) by default.")
    num_beams: int = Field(1, ge=1, le=8, description="Beam search width (1 = off).")
    repetition_penalty: float = Field(1.0, gt=0, le=10, description="1.0 = off; e.g. 1.8 against repetition.")
    no_repeat_ngram_size: int = Field(0, ge=0, description="Forbid repeating n-grams of this size (0 = off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (output is cut before them).")


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of the model deployment."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(2.0, gt=0, description="Requests per replica the autoscaler aims for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Sustained load needed before adding replicas.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Sustained quiet needed before removing replicas.")
    metrics_interval_s: float = Field(10.0, gt=0, description="How often replicas report load.")
    look_back_period_s: float = Field(30.0, gt=0, description="Window over which load is averaged.")


class VLLMEngineConfig(Section):
    """serve.engine=vllm: what ray.serve.llm's LLMConfig passes to the vLLM engine."""

    max_model_len: Optional[int] = Field(None, gt=0, description="Context length; default: the model's own.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights and activations (auto: the model's, bf16 on GPU; use float32 on CPU)."
    )
    enforce_eager: bool = Field(False, description="Skip CUDA-graph capture (faster start, slower decode).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM may take.")
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="KV cache on CPU (VLLM_CPU_KVCACHE_SPACE), GiB.")
    max_lora_rank: int = Field(16, ge=1, description="Largest LoRA rank among serve.adapters.")
    max_num_seqs: Optional[int] = Field(None, ge=1, description="Requests per vLLM batch; default vLLM's.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Further vLLM engine arguments, passed as given (e.g. {seed: 0})."
    )


class ServeConfig(Section):
    """The OpenAI-compatible HTTP service (Ray Serve)."""

    model: Optional[str] = Field(
        None, description="Merged model directory or URI; default: the pipeline's final model "
        "(<storage_path>/<run_name>/models/sft, else models/pretrain)."
    )
    served_model_name: Optional[str] = Field(None, description="Name in /v1/models and responses; default run_name.")
    engine: Literal["hf", "vllm"] = Field(
        "hf", description="hf: transformers with continuous batching (CPU/GPU, every generation parameter); "
        "vllm: vLLM through ray.serve.llm (GPU, or CPU with vllm-cpu; no beam search or n-gram bans)."
    )
    host: str = Field("127.0.0.1", description="HTTP bind address (0.0.0.0 to expose it beyond this machine).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    num_replicas: int = Field(1, ge=1, description="Replicas when autoscaling is off.")
    autoscaling: Optional[AutoscalingConfig] = Field(None, description="Autoscale replicas on load.")
    num_cpus_per_replica: float = Field(1, gt=0, description="CPUs per replica (also its torch threads).")
    num_gpus_per_replica: float = Field(0, ge=0, description="GPUs per replica.")
    max_ongoing_requests: int = Field(32, ge=1, description="Concurrent requests a replica accepts.")
    max_batch_size: int = Field(
        8, ge=1, description="hf engine, continuous batching: most requests decoded together per replica "
        "(they join and leave between decode steps; 1 = one at a time)."
    )
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for.")
    defaults: GenerationDefaults = Field(default_factory=GenerationDefaults, description="Generation defaults.")
    api_keys_env: Optional[str] = Field(
        None, description="Name of an environment variable holding comma-separated API keys (Bearer auth)."
    )
    api_keys_file: Optional[str] = Field(None, description="File with one API key per line (Bearer auth).")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Multiplexing: model name -> LoRA adapter URI, served on the base model."
    )
    max_adapters_per_replica: int = Field(4, ge=1, description="Adapters kept loaded per replica (LRU).")
    trust_remote_code: bool = Field(False, description="Allow custom modelling code of the served model.")
    vllm: VLLMEngineConfig = Field(default_factory=VLLMEngineConfig, description="serve.engine=vllm settings.")

    @model_validator(mode="after")
    def _batching_fits(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("serve.max_ongoing_requests must be >= serve.max_batch_size, or batches never fill")
        return self
