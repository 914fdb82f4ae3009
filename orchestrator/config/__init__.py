"""The typed configuration tree, one module per section.

One YAML file describes a whole run: the base model and tokenizer, the cluster shape, where
checkpoints go, and the stages (``pretrain`` = continued pretraining, ``sft`` = supervised
fine-tuning, ``preference`` = DPO and friends), each with its own data and training settings. Any key can be overridden on the
command line with a dotted path, e.g. ``sft.train.learning_rate=1e-4``.

Every field carries a description; that text is the reference documentation
(``orchestrator config schema`` prints it). The sections live in their own modules
(`config.model`, `config.data`, `config.train`, ...); `config.loader` reads YAML and overrides.
Everything is re-exported here, so `from orchestrator.config import PipelineConfig` works.
"""
from orchestrator.config.model import TinyModelConfig, ModelConfig, TokenizerTrainingConfig, TokenizerConfig  # noqa: F401
from orchestrator.config.data import CANONICAL_FIELDS, RecordShape, RoleTagsConfig, PrefixedTurnsConfig, DataSourceConfig, ReplayConfig, PrepareConfig, DataConfig, template_keys  # noqa: F401
from orchestrator.config.train import DEFAULT_LR_FULL, DEFAULT_LR_LORA, DEFAULT_LR_PROMPT, FULL_WEIGHT_METHODS, ADAPTER_METHODS, MERGEABLE_METHODS, PROMPT_METHODS, LoraConfig, AdaLoraSettings, PromptLearningConfig, FreezeConfig, TrainConfig, resolve_precision  # noqa: F401
from orchestrator.config.distributed import DistributedConfig, ModelTaskConfig  # noqa: F401
from orchestrator.config.checkpoint import (  # noqa: F401
    CheckpointConfig, NodeCacheConfig, S3Config, StorageConfig, s3_settings,
)
from orchestrator.config.serve import GenerationDefaults, AutoscalingConfig, ServeConfig, VLLMEngineConfig  # noqa: F401
from orchestrator.config.eval import EvalGenerationConfig, QASetConfig, MultipleChoiceSetConfig, DEFAULT_REFUSAL_PATTERNS, HonestyConfig, PerplexityConfig, PreferenceEvalConfig, EvalConfig  # noqa: F401
from orchestrator.config.plan import PlanConfig  # noqa: F401
from orchestrator.config.tune import SearchDimension, PositiveDimension, FractionDimension, NonNegativeDimension, CountDimension, NonNegativeCountDimension, SearchSpaceConfig, SEARCH_PARAMETER_KEYS, StageSearchSpaces, AshaConfig, TuneConfig  # noqa: F401
from orchestrator.config.tracking import MlflowConfig, WandbConfig, TrackingConfig  # noqa: F401
from orchestrator.config.preference import PreferenceTrainConfig  # noqa: F401
from orchestrator.config.pipeline import StageConfig, PreferenceStageConfig, PipelineConfig, STAGES  # noqa: F401
from orchestrator.config.loader import parse_override, apply_overrides, load_config, load_config_for_models, config_from_dict, describe_schema  # noqa: F401
