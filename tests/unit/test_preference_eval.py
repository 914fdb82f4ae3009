"""Preference accuracy in the evaluation report: held-out pairs → loglik requests → accuracy and margin."""

from __future__ import annotations

import json

from orchestrator.config import load_config
from orchestrator.data.preference import PreferencePair
from orchestrator.evaluation.sets import describe_sets, load_eval_sets
from orchestrator.evaluation.tasks import LOGLIK, build_requests, summarise

CONFIG = "configs/tiny-preference.yaml"


def test_held_out_pairs_are_the_ones_stage_3_held_out(repo_root):
    config = load_config(repo_root / CONFIG, ["eval.preference={}"])
    sets = load_eval_sets(config)
    assert len(sets.pairs) == 8 and all(isinstance(p, PreferencePair) for p in sets.pairs)  # 20% of 40
    from orchestrator.data.prepare import split_eval
    from orchestrator.data.preference import load_preference_records

    records, _ = load_preference_records(config.preference.data.sources, seed=config.preference.data.shuffle_seed)
    assert sets.pairs == split_eval(records, 0.2, config.preference.data.shuffle_seed)[1]
    assert describe_sets(sets, config.eval)["preference"] == {"kind": "preference", "items": 8,
                                                              "path": "preference held-out pairs"}


def test_requests_and_accuracy(repo_root):
    config = load_config(repo_root / CONFIG, ["eval.preference={max_records: 3}"])
    sets = load_eval_sets(config)
    rows = [r for r in build_requests(sets) if r["key"].startswith("preference#")]
    assert len(rows) == 3 and all(r["task"] == LOGLIK for r in rows)
    payload = json.loads(rows[0]["payload"])
    assert payload["continuations"] == [sets.pairs[0].chosen, sets.pairs[0].rejected]
    assert payload["messages"][-1][0] == "user"
    # per-token means: pair 0 chosen wins (−1 vs −2), pair 1 loses (−3 vs −1), pair 2 wins (−0.5 vs −1)
    responses = {"preference#0": {"logliks": [-10.0, -4.0], "tokens": [10, 2]},
                 "preference#1": {"logliks": [-30.0, -2.0], "tokens": [10, 2]},
                 "preference#2": {"logliks": [-5.0, -2.0], "tokens": [10, 2]}}
    scores = summarise(sets, responses, [])
    assert scores.metrics["preference/accuracy"] == 2 / 3
    assert abs(scores.metrics["preference/margin"] - (1.0 - 2.0 + 0.5) / 3) < 1e-9
