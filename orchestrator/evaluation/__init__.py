"""Evaluation of a run's models after training: perplexity, generation QA, multiple choice, honesty.

`metrics` (pure metric functions) ← `sets` (files → validated items) → `tasks` (items → model
requests; responses → metrics) → `scoring` (one model answering requests; no Ray) → `runner`
(Ray Data replicas, one report per run) → `report` (Markdown, JSON, PNG loss curves).
"""
