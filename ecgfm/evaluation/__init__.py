"""Evaluation beyond one test run: one checkpoint scored on several lead subsets (``ecgfm subsets``)."""

from ecgfm.evaluation.subsets import DEFAULT_SUBSETS, SubsetPlan, evaluate_subsets, mask_leads, plan_subsets

__all__ = ["DEFAULT_SUBSETS", "SubsetPlan", "evaluate_subsets", "mask_leads", "plan_subsets"]
