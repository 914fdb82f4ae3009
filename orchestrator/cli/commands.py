"""What each `orchestrator` sub-command does: load the config, set the process up, call one library function.

Library modules are imported by the command that needs them, so that `orchestrator plan` or
`orchestrator k8s validate` do not pay for importing torch and Ray.
"""

from __future__ import annotations

import argparse
import json

def run_command(args: argparse.Namespace) -> int:
    from orchestrator.config import describe_schema, load_config, load_config_for_models

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
    if args.command == "runs":
        return _runs(args)
    if args.command == "eval":
        from orchestrator.evaluation.runner import evaluate_run, parse_model_arg
        from orchestrator.runtime import check_storage_outlives_job

        models = [parse_model_arg(m) for m in args.model or []]
        config = (load_config_for_models(args.config, args.overrides, models[0].uri) if models
                  else load_config(args.config, args.overrides))
        check_storage_outlives_job(config.checkpoint)
        outcome = evaluate_run(config, models, args.out, args.address)
        if not models:
            from orchestrator.pipeline import track_evaluation

            track_evaluation(config, outcome)
        print(json.dumps({"report": outcome.files, "metrics": outcome.metrics}, ensure_ascii=False, indent=1))
        return 0
    if args.command == "tune":
        return _tune(args)
    if args.command in ("prepare", "data"):
        return _prepare(args)
    if args.command == "vocab":
        return _vocab(args)
    if args.command in ("k8s", "cluster"):
        return _validate_deployment(args)
    if args.command == "plan":
        from orchestrator.plan import plan_command
        from orchestrator.runtime import configure_storage

        config = load_config(args.config, args.overrides) if args.config else None
        if config is not None:
            configure_storage(config.storage)
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
    from orchestrator.cli.output import run_log, run_summary
    from orchestrator.layout import RunLayout
    from orchestrator.pipeline import PipelineResult, run_pipeline
    from orchestrator.runtime import check_storage_outlives_job
    from orchestrator.train.stage import run_stage

    config = load_config(args.config, args.overrides + (["plan.strict=true"] if args.strict else []))
    check_storage_outlives_job(config.checkpoint)
    with run_log(RunLayout.of(config)):
        if args.command == "pipeline":
            result = run_pipeline(config, args.address)
        else:
            result = PipelineResult([run_stage(config, args.command, ray_address=args.address)])
    print("\n".join(run_summary(config, result)))
    return 0


def _vocab(args: argparse.Namespace) -> int:
    from orchestrator.config import DataSourceConfig, load_config
    from orchestrator.runtime import configure_storage

    if args.config:
        configure_storage(load_config(args.config).storage)
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


def _prepare(args: argparse.Namespace) -> int:
    """`orchestrator prepare` (the manifest's summary per stage) and `orchestrator data inspect` (rows decoded)."""
    from orchestrator.cli.output import log_to_file
    from orchestrator.config import load_config
    from orchestrator.data.inspect import decoded_rows
    from orchestrator.errors import ConfigError
    from orchestrator.layout import RunLayout
    from orchestrator.train.stage import prepare_stages

    config = load_config(args.config, args.overrides)
    log_to_file(RunLayout.of(config).driver_log)
    stages = args.stage or [name for name in ("pretrain", "sft") if getattr(config, name) is not None]
    if not stages:
        raise ConfigError("the config has no pretrain or sft stage; only those prepare a shard set")
    for prepared in prepare_stages(config, stages, args.address):
        stage, data = prepared.stage, prepared.data
        if args.command == "prepare":
            summary = {"stage": stage, "shard_set": data.set_uri, "prepared": "nothing (cached)" if data.reused
                       else f"{len(data.manifest.shards)} shards in {data.seconds:.1f} s",
                       "changed": data.change or None, "train_rows": data.train_rows, "eval_rows": data.eval_rows,
                       "stats": {k: v for k, v in data.stats.items() if k not in ("files", "bad_records_listed")}}
            print(json.dumps(summary, ensure_ascii=False, indent=1))
            continue
        print(f"{stage} ({args.part} rows) from {data.set_uri}:")
        for row_id, text in decoded_rows(data.set_uri, data.manifest, prepared.tokenizer(), args.n, args.part):
            print(f"\n--- row {row_id} ---\n{text}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from orchestrator.config import STAGES, load_config
    from orchestrator.cli.output import run_log
    from orchestrator.errors import ConfigError
    from orchestrator.layout import RunLayout
    from orchestrator.runtime import check_storage_outlives_job
    from orchestrator.tune.results import format_table
    from orchestrator.tune.sweep import run_sweep

    config = load_config(args.config, args.overrides + (["plan.strict=true"] if args.strict else []))
    check_storage_outlives_job(config.checkpoint)
    stages = args.stage or config.tune.stages or [name for name in STAGES if getattr(config, name) is not None]
    if len(stages) > 1 and not (args.stage or config.tune.stages):
        raise ConfigError("the config has both stages; say which to sweep with --stage (or tune.stages)")
    for stage in stages:
        with run_log(RunLayout.of(config)):
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

    from orchestrator.config import load_config
    from orchestrator.runtime import ensure_ray, quiet_serve_logger
    from orchestrator.serve.app import run_server

    quiet_serve_logger()
    config = load_config(args.config, args.overrides)
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


def _runs(args: argparse.Namespace) -> int:
    from orchestrator import storage
    from orchestrator.config import load_config
    from orchestrator.layout import RunLayout
    from orchestrator.runs import format_run, format_runs, list_runs, read_run
    from orchestrator.runtime import configure_storage

    if args.config:
        configure_storage(load_config(args.config).storage)
    if args.action == "list":
        runs = list_runs(args.root)
        print(json.dumps([r.to_json() for r in runs], indent=1, default=str) if args.json else format_runs(runs))
        return 0
    parent, _, name = storage.join(args.run).rpartition("/")
    run = read_run(RunLayout(parent, name))
    print(json.dumps(run.to_json(), indent=1, default=str) if args.json else format_run(run))
    return 0 if run.stages else 1


def _list_checkpoints(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from orchestrator.checkpoint import list_checkpoints
    from orchestrator.config import load_config
    from orchestrator.runtime import configure_storage

    if args.config:
        configure_storage(load_config(args.config).storage)
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
