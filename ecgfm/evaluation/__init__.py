"""Evaluation beyond the training loop: one checkpoint scored on several lead subsets (``ecgfm.evaluation.subsets``)
and the per-split tables callback (``ecgfm.evaluation.tables``). Import the module you need; this package imports
nothing, so the task can use the tables callback without loading the evaluators that load tasks."""
