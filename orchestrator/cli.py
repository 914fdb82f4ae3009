"""`orchestrator …` sub-commands. Each parses arguments, loads the config and calls one library function."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional

from orchestrator.errors import OrchestratorError


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", required=True, help="YAML config file (see configs/)")
    parser.add_argument("--address", default=None, help="Ray address; default: RAY_ADDRESS or a new local cluster")
    parser.add_argument("--strict", action="store_true", help="refuse to launch when the memory plan says it "
                        "will not fit (plan.strict=true)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sft.train.learning_rate=1e-4")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="orchestrator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("pretrain", "stage 1: continued pretraining on documents"),
        ("sft", "stage 2: supervised fine-tuning on conversations"),
        ("pipeline", "stage 1, merge, then stage 2 on stage 1's model"),
    ):
        _add_config_args(sub.add_parser(name, help=help_text))
    tune_cmd = sub.add_parser("tune", help="sweep a stage's hyperparameters with Ray Tune (the config's `tune:` "
                              "section); running it again resumes an interrupted sweep")
    _add_config_args(tune_cmd)
    tune_cmd.add_argument("--stage", choices=["pretrain", "sft"], action="append",
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
    plan.add_argument("--stage", choices=["pretrain", "sft"], action="append", help="stage(s) to plan (default: all)")
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
    return parser


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


def run_command(args: argparse.Namespace) -> int:
    from orchestrator.config import describe_schema, load_config

    if args.command == "config":
        if args.what == "schema":
            print("\n".join(describe_schema()))
        else:
            import yaml

            config = load_config(args.config, args.overrides)
            print(yaml.safe_dump(config.model_dump(mode="json"), allow_unicode=True, sort_keys=False))
        return 0
    if args.command == "merge":
        from orchestrator.model.export import merge_to

        diff = merge_to(args.base, args.adapter, args.out)
        print(json.dumps({"out": args.out, "adapters": args.adapter, "max_abs_logit_diff": diff}))
        return 0
    if args.command == "serve":
        return _serve(args)
    if args.command == "checkpoints":
        return _list_checkpoints(args)
    if args.command == "eval":
        from orchestrator.evaluation.runner import evaluate_run, parse_model_arg

        outcome = evaluate_run(load_config(args.config, args.overrides),
                               [parse_model_arg(m) for m in args.model or []], args.out, args.address)
        print(json.dumps({"report": outcome.files, "metrics": outcome.metrics}, ensure_ascii=False, indent=1))
        return 0
    if args.command == "tune":
        return _tune(args)
    if args.command == "vocab":
        return _vocab(args)
    if args.command in ("k8s", "cluster"):
        return _validate_deployment(args)
    if args.command == "plan":
        from orchestrator import storage
        from orchestrator.config import s3_settings
        from orchestrator.plan import plan_command

        config = load_config(args.config, args.overrides) if args.config else None
        if config is not None:
            storage.configure(s3_settings(config.storage))
        text, ok = plan_command(config, overrides=args.overrides, stages=args.stage, preset=args.preset,
                                model_dir=args.model_dir, tokens=int(args.tokens) if args.tokens else None,
                                method=args.method, precision=args.precision, markdown=args.markdown)
        print(text, end="")
        return 0 if ok else 1
    if args.command == "generate":
        from orchestrator.model.generate import generate_text, load_for_generation

        model, tokenizer = load_for_generation(args.model)
        print(generate_text(model, tokenizer, args.prompt, args.max_new_tokens, chat=not args.raw,
                            do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty))
        return 0
    from orchestrator.train.pipeline import run_pipeline, run_stage

    config = load_config(args.config, args.overrides + (["plan.strict=true"] if args.strict else []))
    if args.command == "pipeline":
        stages = run_pipeline(config, args.address).stages
    else:
        stages = [run_stage(config, args.command, ray_address=args.address)]
    for result in stages:
        print(json.dumps({"stage": result.stage, "model": result.model_uri, "checkpoint": result.checkpoint_uri,
                          "metrics": result.metrics, "data": result.data_stats,
                          "wall_seconds": round(result.wall_seconds, 1)}, ensure_ascii=False))
    return 0


def _vocab(args: argparse.Namespace) -> int:
    from orchestrator import storage
    from orchestrator.config import DataSourceConfig, load_config, s3_settings

    if args.config:
        storage.configure(s3_settings(load_config(args.config).storage))
    if args.action == "build":
        from orchestrator.vocab.build import VocabBuildSettings, build_domain_vocab

        settings = VocabBuildSettings(model_type=args.model_type, vocab_size=args.vocab_size,
                                      character_coverage=args.character_coverage, held_out_share=args.held_out,
                                      seed=args.seed, wordlists=tuple(args.wordlist),
                                      min_term_count=args.min_term_count, max_seed_terms=args.max_seed_terms)
        sources = [DataSourceConfig(path=p, format=args.format, text_unit=args.text_unit) for p in args.corpus]
        report = build_domain_vocab(sources, args.out, settings)
        report.pop("files")
    else:
        from orchestrator.vocab.merge import merge_vocabulary

        samples = [DataSourceConfig(path=p, text_unit=args.sample_text_unit) for p in args.sample]
        report = merge_vocabulary(args.base_tokenizer, args.domain, args.out, samples, args.max_terms)
    print(json.dumps(report, ensure_ascii=False, indent=1))
    return 0


def _tune(args: argparse.Namespace) -> int:
    from orchestrator.config import STAGES, load_config
    from orchestrator.errors import ConfigError
    from orchestrator.tune.results import format_table
    from orchestrator.tune.sweep import run_sweep

    config = load_config(args.config, args.overrides + (["plan.strict=true"] if args.strict else []))
    stages = args.stage or config.tune.stages or [name for name in STAGES if getattr(config, name) is not None]
    if len(stages) > 1 and not (args.stage or config.tune.stages):
        raise ConfigError("the config has both stages; say which to sweep with --stage (or tune.stages)")
    for stage in stages:
        result = run_sweep(config, stage, ray_address=args.address)
        print(f"\n{stage} sweep{' (resumed)' if result.resumed else ''}: {len(result.rows)} trials in "
              f"{result.wall_seconds:.1f} s")
        print(format_table(result.rows, config.tune.metric))
        print(f"best trial: {result.best.trial_id} {config.tune.metric}={result.best.best_metric:.4f} "
              f"{result.best.params}")
        print(f"best checkpoint: {result.best_checkpoint}")
        print(f"best config: {result.files['best_config']}")
        print(f"results: {result.files['csv']} {result.files['json']}", flush=True)
    return 0


def _serve(args: argparse.Namespace) -> int:
    import time

    from orchestrator import storage
    from orchestrator.config import load_config, s3_settings
    from orchestrator.serve.app import run_server
    from orchestrator.train.trainer import ensure_ray

    config = load_config(args.config, args.overrides)
    storage.configure(s3_settings(config.storage))
    ensure_ray(args.address)
    url = run_server(config, blocking=False)
    print(f"serving on {url}/v1 (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        from ray import serve

        serve.shutdown()
    return 0


def _validate_deployment(args: argparse.Namespace) -> int:
    from pathlib import Path

    from orchestrator.deploy import validate

    paths = [Path(p) for p in args.paths]
    if args.command == "k8s":
        report = validate.validate_k8s(paths or validate.default_k8s_paths(),
                                       Path(args.crds) if args.crds else validate.DEFAULT_CRDS)
    else:
        report = validate.validate_cluster_configs(paths or validate.default_cluster_paths())
    for checked in report.checked:
        print(f"checked  {checked}")
    for unchecked in report.unchecked:
        print(f"no schema {unchecked}")
    for problem in report.problems:
        print(f"PROBLEM  {problem}")
    print(f"{len(report.problems)} problem(s)")
    return 0 if report.ok else 1


def _list_checkpoints(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from orchestrator import storage
    from orchestrator.config import load_config, s3_settings
    from orchestrator.train.checkpoint import list_checkpoints

    if args.config:
        storage.configure(s3_settings(load_config(args.config).storage))
    infos = list_checkpoints(args.uri)
    if args.json:
        print(json.dumps([asdict(i) for i in infos], indent=1))
        return 0
    if not infos:
        print(f"no checkpoints under {args.uri}")
        return 0
    print(f"{'checkpoint':<26}{'step':>7}{'epoch':>7}{'eval_loss':>11}{'size_MB':>10}  status")
    for i in infos:
        loss = f"{i.eval_loss:.4f}" if i.eval_loss is not None else "-"
        status = "complete" if i.complete else f"INCOMPLETE ({i.problem})"
        print(f"{i.name:<26}{i.step if i.step is not None else '-':>7}{i.epoch if i.epoch is not None else '-':>7}"
              f"{loss:>11}{i.size_bytes / 2**20:>10.2f}  {status}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run_command(args)
    except OrchestratorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
