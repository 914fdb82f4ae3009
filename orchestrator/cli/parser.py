"""The `orchestrator` argument parser: every sub-command and its options (no library imports, so
`orchestrator --help` is instant and the deployment validator can parse job entrypoints)."""

from __future__ import annotations

import argparse

DESCRIPTION = "`orchestrator …` sub-commands. Each parses arguments, loads the config and calls one library function."


class IntermixedParser(argparse.ArgumentParser):
    """Options may come before or after positionals (`config show --config x.yaml a.b=1` and
    `config --config x.yaml show a.b=1` alike): a parser without sub-commands parses intermixed."""

    _parsing_intermixed = False

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 - argparse's signature
        if self._parsing_intermixed or self._subparsers is not None:
            return super().parse_known_args(args, namespace)
        self._parsing_intermixed = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._parsing_intermixed = False


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--address", default=None, help="Ray address; default: RAY_ADDRESS or a new local cluster")
    parser.add_argument("--strict", action="store_true", help="refuse to launch when the memory plan says it "
                        "will not fit (plan.strict=true)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.train.learning_rate=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = IntermixedParser(prog="orchestrator", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("pretrain", "stage 1: continued pretraining on documents"),
        ("sft", "stage 2: supervised fine-tuning on conversations"),
        ("preference", "stage 3: preference optimisation (DPO, IPO, ORPO, SimPO, KTO) on stage 2's model"),
        ("pipeline", "every configured stage in order, each on the previous stage's merged model"),
    ):
        _add_config_args(sub.add_parser(name, help=help_text))
    prepare = sub.add_parser("prepare", help="prepare a stage's data on the Ray cluster into the run's cached shard "
                             "set, as each stage does first (a rerun with unchanged inputs prepares nothing)")
    _add_config_args(prepare)
    prepare.add_argument("--stage", choices=["pretrain", "sft"], action="append",
                         help="stage(s) to prepare; default: the config's pretrain and sft stages")
    data_cmd = sub.add_parser("data", help="prepared data").add_subparsers(dest="action", required=True)
    inspect = data_cmd.add_parser("inspect", help="a few prepared rows decoded, the trained (label) spans marked "
                                  "⟦…⟧ (prepares first when the cache has no set for the config)")
    _add_config_args(inspect)
    inspect.add_argument("--stage", choices=["pretrain", "sft"], action="append",
                         help="stage(s) to show; default: the config's pretrain and sft stages")
    inspect.add_argument("-n", type=int, default=3, help="rows to show per stage (default 3)")
    inspect.add_argument("--part", choices=["train", "eval"], default="train", help="which part (default train)")
    tune_cmd = sub.add_parser("tune", help="sweep a stage's hyperparameters with Ray Tune (the config's `tune:` "
                              "section); running it again resumes an interrupted sweep")
    _add_config_args(tune_cmd)
    tune_cmd.add_argument("--stage", choices=["pretrain", "sft", "preference"], action="append",
                          help="stage(s) to sweep; default: tune.stages, else the config's only stage")
    show = sub.add_parser("config", help="print the resolved config (after overrides) or the schema")
    show.add_argument("what", choices=["show", "schema"])
    show.add_argument("--config", "-c")
    show.add_argument("overrides", nargs="*")
    checkpoints = sub.add_parser("checkpoints", help="list a stage's checkpoints (local path or s3:// URI)")
    checkpoints.add_argument("action", choices=["list"])
    checkpoints.add_argument("uri", help="a stage's run directory, e.g. s3://bucket/runs/<run>/pretrain")
    checkpoints.add_argument("--config", "-c", help="config whose storage.s3 settings to use (else AWS defaults)")
    checkpoints.add_argument("--json", action="store_true", help="machine-readable output")
    runs = sub.add_parser("runs", help="runs at a glance: what a storage root (local or s3://) holds")
    runs_actions = runs.add_subparsers(dest="action", required=True)
    runs_list = runs_actions.add_parser("list", help="every run under a root: stages done, best eval loss, latest "
                                        "complete checkpoint, sweep best")
    runs_list.add_argument("root", help="a checkpoint.storage_path, e.g. runs or s3://bucket/runs")
    runs_show = runs_actions.add_parser("show", help="one run per stage: data fingerprint, steps, metrics, "
                                        "checkpoints, lineage")
    runs_show.add_argument("run", help="a run directory, e.g. runs/tiny-demo or s3://bucket/runs/tiny-demo")
    for action in (runs_list, runs_show):
        action.add_argument("--json", action="store_true", help="machine-readable output")
        action.add_argument("--config", "-c", help="config whose storage.s3 settings to use (else AWS defaults)")
    merge = sub.add_parser("merge", help="fold LoRA adapter(s) into a base model (checked by logits)")
    merge.add_argument("--base", required=True, help="base model directory or URI")
    merge.add_argument("--adapter", required=True, action="append", help="adapter directory or URI (repeatable, in order)")
    merge.add_argument("--out", required=True, help="output directory or URI")
    serve_cmd = sub.add_parser("serve", help="serve the final model over an OpenAI-compatible HTTP API (Ray Serve)")
    _add_config_args(serve_cmd)
    gen = sub.add_parser("generate", help="print a completion from a model directory")
    gen.add_argument("--model", required=True, help="Hugging Face model directory (e.g. runs/<run>/models/sft)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--raw", action="store_true", help="no chat template: continue the prompt as plain text")
    gen.add_argument("--do-sample", action="store_true")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    evaluate = sub.add_parser("eval", help="evaluate models (perplexity, QA, multiple choice, honesty) and write a "
                              "report; default: the run's base and stage models")
    evaluate.add_argument("--config", "-c", required=True, help="YAML config whose `eval:` section lists the sets")
    evaluate.add_argument("--model", action="append", help="model directory or URI, or NAME=DIR_OR_URI (repeatable); "
                          "default: <run>/base (or model.base), models/pretrain, models/sft")
    evaluate.add_argument("--out", help="report directory or URI; default <storage_path>/<run_name>/eval "
                          "(with --model: <run>/eval-<names>)")
    evaluate.add_argument("--address", default=None, help="Ray address; default: RAY_ADDRESS or a new local cluster")
    evaluate.add_argument("overrides", nargs="*", help="dotted overrides, e.g. eval.generation.max_tokens=64")
    plan = sub.add_parser("plan", help="memory and throughput plan: does it fit, what to change, how long")
    plan.add_argument("--config", "-c", help="YAML config to plan (default: GPU defaults with an sft stage)")
    plan.add_argument("--preset", help="plan a named model instead of the config's: 7b, 13b, 34b, 70b")
    plan.add_argument("--model-dir", help="plan the model whose config.json is in this directory or URI")
    plan.add_argument("--stage", choices=["pretrain", "sft", "preference"], action="append", help="stage(s) to plan (default: all)")
    plan.add_argument("--tokens", type=float, help="dataset size in tokens, for wall time and GPU-hours")
    plan.add_argument("--method", choices=["full", "freeze", "lora", "qlora-8bit", "qlora-4bit", "prompt", "p-tuning"])
    plan.add_argument("--precision", choices=["fp32", "amp", "bf16", "pure-bf16"])
    plan.add_argument("--markdown", action="store_true", help="Markdown output")
    plan.add_argument("overrides", nargs="*", help="dotted overrides, e.g. plan.gpu_memory_gib=40")
    k8s = sub.add_parser("k8s", help="KubeRay manifests").add_subparsers(dest="action", required=True)
    k8s_validate = k8s.add_parser("validate", help="check them offline: CRD schemas, KubeRay's and Serve's rules, "
                                  "the pinned Ray")
    k8s_validate.add_argument("paths", nargs="*", help="kustomize directories or manifest files "
                              "(default: k8s/overlays/*)")
    k8s_validate.add_argument("--crds", help="directory of the KubeRay CRDs (default: ../shared/kuberay-v1.7.0/crds)")
    cluster = sub.add_parser("cluster", help="Ray cluster-launcher YAML").add_subparsers(dest="action", required=True)
    cluster_validate = cluster.add_parser("validate", help="check it offline with Ray's own checks")
    cluster_validate.add_argument("paths", nargs="*", help="cluster YAML files (default: cluster/*.yaml)")
    _add_vocab_parser(sub)
    _add_verbose(parser)
    return parser


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """`--verbose` on every command (after its name, like its other options)."""
    if parser._subparsers is None:
        parser.add_argument("--verbose", "-v", action="store_true", help="show every log line (Ray's worker "
                            "output, DeepSpeed, library warnings) instead of progress bars and summaries")
        return
    for action in parser._subparsers._group_actions:
        for child in dict.fromkeys(action.choices.values()):
            _add_verbose(child)


def _add_vocab_parser(sub: argparse._SubParsersAction) -> None:
    vocab = sub.add_parser("vocab", help="domain vocabulary: train a SentencePiece model, merge it into a tokenizer")
    actions = vocab.add_subparsers(dest="action", required=True)
    build = actions.add_parser("build", help="train a domain SentencePiece model on documents (local or URI, any "
                               "supported format), seeded with word-list terms found in them")
    build.add_argument("--corpus", required=True, action="append", help="file, directory, glob or URI (repeatable)")
    build.add_argument("--format", default="auto", choices=["auto", "document", "alpaca", "multiturn", "sharegpt"])
    build.add_argument("--text-unit", default="auto", choices=["auto", "file", "line", "paragraph"])
    build.add_argument("--wordlist", action="append", default=[], help="word list: one term per line or "
                       "term<TAB>frequency, e.g. THUOCL (repeatable)")
    build.add_argument("--out", required=True, help="output directory or URI")
    build.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    build.add_argument("--vocab-size", type=int, default=8000)
    build.add_argument("--held-out", type=float, default=0.05, help="share of documents held out for measuring")
    build.add_argument("--character-coverage", type=float, default=0.9995)
    build.add_argument("--min-term-count", type=int, default=2, help="occurrences a word-list term needs to seed")
    build.add_argument("--max-seed-terms", type=int, default=2000)
    build.add_argument("--seed", type=int, default=42)
    merge = actions.add_parser("merge", help="add the domain pieces a base tokenizer lacks (SentencePiece or "
                               "BPE tokenizer.json); report sizes and characters per token before/after")
    merge.add_argument("--base-tokenizer", required=True, help="tokenizer (or model) directory or URI")
    merge.add_argument("--domain", required=True, action="append", help="a `vocab build` directory, a "
                       "SentencePiece .model file or a word list (repeatable)")
    merge.add_argument("--out", required=True, help="output directory or URI")
    merge.add_argument("--sample", action="append", default=[], help="documents to measure on (repeatable); "
                       "default: the held-out documents of the `vocab build` directories")
    merge.add_argument("--sample-text-unit", default="auto", choices=["auto", "file", "line", "paragraph"])
    merge.add_argument("--max-terms", type=int, default=2000, help="most frequent word-list terms added")
    for parser in (build, merge):
        parser.add_argument("--config", "-c", help="config whose storage.s3 settings to use (else AWS defaults)")
