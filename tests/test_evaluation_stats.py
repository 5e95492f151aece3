"""The statistics of ``ecgfm.evaluation``: weighted metrics, the patient-level bootstrap, proportions, DeLong,
thresholds, calibration and agreement, against slow references written here and published worked examples; and the
heads' temperature, which changes probabilities but no decision and leaves older checkpoints loadable."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from ecgfm.evaluation import metrics_np as m
from ecgfm.evaluation.bootstrap import (
    Interval,
    bootstrap_ci,
    bootstrap_distribution,
    bootstrap_distributions,
    bootstrap_indices,
    strata_by_any_positive,
)
from ecgfm.evaluation.calibration import (
    bland_altman,
    brier_score,
    expected_calibration_error,
    fit_temperature,
    regression_threshold_report,
    reliability_curve,
    temperature_nll,
)
from ecgfm.evaluation.compare import delong_ci, delong_covariance, delong_test, paired_bootstrap
from ecgfm.evaluation.proportions import clopper_pearson_interval, wilson_interval
from ecgfm.evaluation.thresholds import binary_report, choose_threshold, confusion_matrix, operating_points

# ------------------------------------------------------------------------------------------------ slow references


def slow_auroc(y, score):
    """Every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    pos, neg = score[y], score[~y]
    if not len(pos) or not len(neg):
        return math.nan
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def slow_auprc(y, score):
    """Average precision as its step-function definition: over distinct thresholds t (descending), the recall gained
    at t times the precision of calling score >= t."""
    y, score = np.asarray(y, bool), np.asarray(score, float)
    total = 0.0
    for t in sorted(set(score.tolist()), reverse=True):
        called = score >= t
        gained = np.sum(y & (score == t)) / y.sum()
        total += gained * np.sum(y & called) / called.sum()
    return total


def slow_mae(y, pred):
    return float(np.mean(np.abs(np.asarray(pred, float) - np.asarray(y, float))))


def reference_bootstrap(metric, arrays, groups, strata, n_resamples, seed, level=0.95):
    """The documented draw, one resample at a time, on copies: for each resample and each stratum (sorted), draw that
    stratum's patients (sorted) with replacement by ``rng.integers(0, m, m)``, take all their rows, apply ``metric``."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    patients = np.unique(groups)
    strata_of = (
        {p: 0 for p in patients}
        if strata is None
        else {p: np.asarray(strata)[groups == p][0] for p in patients}  # one stratum per patient
    )
    members = [[p for p in patients if strata_of[p] == s] for s in sorted(set(strata_of.values()))]
    rows_of = {p: np.flatnonzero(groups == p) for p in patients}
    values = []
    for _ in range(n_resamples):
        rows = []
        for stratum in members:
            for i in rng.integers(0, len(stratum), len(stratum)):
                rows.extend(rows_of[stratum[i]].tolist())
        values.append(metric(*(np.asarray(a)[rows] for a in arrays)))
    values = np.asarray(values, dtype=float)
    finite = values[np.isfinite(values)]
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(metric(*arrays)), float(low), float(high), int(len(values) - len(finite))


def clustered_data(n_patients=24, seed=0):
    """Patients with 1-4 records each (each record 1-2 windows' worth of rows); label per patient, scores with ties."""
    rng = np.random.default_rng(seed)
    per_patient = rng.integers(1, 5, n_patients)
    groups = np.repeat([f"p{i:02d}" for i in range(n_patients)], per_patient)
    positive = rng.random(n_patients) < 0.4
    positive[:2] = [True, False]
    y = np.repeat(positive, per_patient).astype(int)
    score = np.round(y + rng.normal(size=len(y)), 1)
    return y, score, groups


# ----------------------------------------------------------------------------------------------------- Interval


def test_interval_prints_and_serialises():
    interval = Interval(0.9123, 0.8712, 0.9481, 0.95, "patient bootstrap")
    assert str(interval) == "0.912 (0.871-0.948)"
    assert Interval(-0.02, -0.05, 0.01).format(2) == "-0.02 (-0.05 to 0.01)"
    assert interval.to_dict() == {
        "estimate": 0.9123,
        "low": 0.8712,
        "high": 0.9481,
        "level": 0.95,
        "method": "patient bootstrap",
        "dropped": 0,
    }


# ----------------------------------------------------------------------------------------------------- metrics


def test_weighted_auroc_and_auprc_equal_the_slow_definitions_on_resampled_copies():
    rng = np.random.default_rng(3)
    y = rng.random(60) < 0.35
    score = np.round(rng.normal(size=60) + y, 1)  # many ties
    assert m.auroc(y, score) == pytest.approx(slow_auroc(y, score), abs=1e-12)
    assert m.auprc(y, score) == pytest.approx(slow_auprc(y, score), abs=1e-12)
    weights = rng.integers(0, 4, (7, 60))
    copies = [np.repeat(np.arange(60), w) for w in weights]
    np.testing.assert_allclose(m.auroc(y, score, weights), [slow_auroc(y[c], score[c]) for c in copies], atol=1e-12)
    np.testing.assert_allclose(m.auprc(y, score, weights), [slow_auprc(y[c], score[c]) for c in copies], atol=1e-12)
    assert m.auroc(y, score, weights[2]) == pytest.approx(slow_auroc(y[copies[2]], score[copies[2]]), abs=1e-12)


def test_auroc_known_values_and_undefined_cases():
    assert m.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75  # the classic 4-point example
    assert m.auroc([0, 1], [0.5, 0.5]) == 0.5
    assert m.auprc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx((1 + 2 / 3) / 2)
    assert math.isnan(m.auroc([1, 1, 1], [0.1, 0.2, 0.3]))  # one class: NaN, documented
    assert math.isnan(m.auroc([0, 1], [0.1, 0.2], [1, 0]))  # the positive weighs nothing
    with pytest.raises(ValueError, match="must be 0/1"):
        m.auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN or infinite"):
        m.auroc([0, 1], [0.1, np.nan])
    with pytest.raises(ValueError, match="non-negative"):
        m.auroc([0, 1], [0.1, 0.2], [1, -1])


def test_concordance_and_pdi_match_ecgfm_metrics_weighted_or_not():
    from ecgfm.metrics import ordinal_concordance, polytomous_discrimination_index

    rng = np.random.default_rng(5)
    levels = rng.integers(0, 4, 80)
    score = np.round(levels * 0.6 + rng.normal(size=80), 1)
    probs = rng.dirichlet(np.ones(4), 80)
    probs[:, 1] = np.round(probs[:, 1], 1)  # ties in one category's probability
    weights = rng.integers(0, 3, (4, 80))
    for average in ("pairs", "categories"):
        assert m.concordance(levels, score, average=average) == pytest.approx(
            ordinal_concordance(score, levels, average), abs=1e-12
        )
    assert m.pdi(levels, probs) == pytest.approx(polytomous_discrimination_index(probs, levels)[0], abs=1e-12)
    for w in weights:
        c = np.repeat(np.arange(80), w)
        assert m.concordance(levels, score, w) == pytest.approx(ordinal_concordance(score[c], levels[c]), abs=1e-12)
        assert m.pdi(levels, probs, w) == pytest.approx(polytomous_discrimination_index(probs[c], levels[c])[0])
    np.testing.assert_allclose(
        m.concordance(levels, score, weights, average="categories"),
        [
            ordinal_concordance(score[np.repeat(np.arange(80), w)], levels[np.repeat(np.arange(80), w)], "categories")
            for w in weights
        ],
        atol=1e-12,
    )


def test_regression_and_decision_metrics():
    y = np.array([4.0, 5.0, 6.0, 7.0])
    pred = np.array([4.5, 5.0, 5.0, 8.0])
    assert m.mae(y, pred) == pytest.approx(0.625)
    assert m.rmse(y, pred) == pytest.approx(math.sqrt((0.25 + 0 + 1 + 1) / 4))
    assert m.pearson_r(y, pred) == pytest.approx(np.corrcoef(y, pred)[0, 1])
    assert m.mae(y, pred, [2, 0, 0, 1]) == pytest.approx((2 * 0.5 + 1) / 3)
    truth = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    called = np.array([1, 1, 0, 0, 0, 1, 0, 1])  # tp 3, fn 1, fp 1, tn 3
    assert m.confusion_counts(truth, called) == {"tp": 3.0, "fp": 1.0, "fn": 1.0, "tn": 3.0}
    assert m.sensitivity(truth, called) == 0.75
    assert m.specificity(truth, called) == 0.75
    assert m.ppv(truth, called) == 0.75
    assert m.npv(truth, called) == 0.75
    assert m.accuracy(truth, called) == 0.75
    assert m.f1(truth, called) == 0.75
    assert m.mcc(truth, called) == pytest.approx((9 - 1) / 16)
    assert math.isnan(m.mcc(truth, np.ones(8)))  # nothing called negative: an empty margin
    np.testing.assert_allclose(m.sensitivity(truth, called, [[1] * 8, [0, 0, 2, 1, 1, 1, 1, 1]]), [0.75, 1 / 3])


# ----------------------------------------------------------------------------------------------------- bootstrap


@pytest.mark.parametrize(
    "metric, slow, make",
    [
        (m.auroc, slow_auroc, lambda y, s: (y, s)),
        (m.auprc, slow_auprc, lambda y, s: (y, s)),
        (m.mae, slow_mae, lambda y, s: (y.astype(float), s)),
        (m.sensitivity, lambda y, c: np.sum(y & c) / np.sum(y), lambda y, s: (y.astype(bool), s > 0.5)),
    ],
)
def test_bootstrap_ci_equals_the_slow_reference_by_patient_and_stratum(metric, slow, make):
    y, score, groups = clustered_data()
    arrays = make(y, score)
    strata = strata_by_any_positive(y, groups)
    for g, s in ((groups, strata), (groups, None), (np.arange(len(y)), None)):
        got = bootstrap_ci(metric, *arrays, groups=g, strata=s, n_resamples=120, seed=7)
        estimate, low, high, dropped = reference_bootstrap(slow, arrays, g, s, 120, 7)
        assert got.estimate == pytest.approx(estimate, abs=1e-12)
        assert (got.low, got.high) == pytest.approx((low, high), abs=1e-12)
        assert got.dropped == dropped
        assert got.method == f"{'stratified ' if s is not None else ''}patient bootstrap, 120 resamples"


def test_any_metric_function_bootstraps_like_the_built_in_one():
    """A plain function (resampled copies), one taking ``w`` (one resample at a time) and one marked
    ``weight_matrix`` (chunks) give the same interval as the vectorised AUROC."""
    y, score, groups = clustered_data(seed=1)
    expected = bootstrap_ci(m.auroc, y, score, groups=groups, n_resamples=60, seed=2)

    def takes_w(y, s, w=None):
        return m.auroc(y, s, w)

    @m.weight_matrix
    def matrix(y, s, w=None):
        return m.auroc(y, s, w)

    for metric in (slow_auroc, takes_w, matrix, functools.partial(m.concordance, average="pairs")):
        got = bootstrap_ci(metric, y, score, groups=groups, n_resamples=60, seed=2)
        assert (got.estimate, got.low, got.high) == pytest.approx((expected.estimate, expected.low, expected.high))


def test_resampling_is_by_patient_with_all_their_records_and_windows():
    """Rows of one patient are always drawn together; strata keep their number of patients in every resample."""
    y, _, groups = clustered_data(n_patients=30, seed=4)
    strata = strata_by_any_positive(y, groups)
    counts = np.concatenate(list(bootstrap_indices(groups, 300, seed=1, strata=strata, chunk=64)))
    assert counts.shape == (300, len(y))
    for patient in np.unique(groups):
        rows = counts[:, groups == patient]
        assert (rows == rows[:, :1]).all()  # every record of a patient comes in the same number of times
    first_rows = np.unique(groups, return_index=True)[1]
    patient_counts = counts[:, first_rows]
    patient_strata = strata[first_rows]
    for s in (0, 1):
        assert (patient_counts[:, patient_strata == s].sum(1) == (patient_strata == s).sum()).all()
    # the draw does not depend on the chunking
    again = np.concatenate(list(bootstrap_indices(groups, 300, seed=1, strata=strata, chunk=7)))
    np.testing.assert_array_equal(counts, again)


def test_a_patient_with_many_windows_counts_once_not_once_per_window():
    """Duplicating every patient's row k times (windows of one record) leaves the patient-level interval exactly as
    it was; resampling the duplicated rows instead pretends there are k times more patients (a narrower interval)."""
    rng = np.random.default_rng(0)
    y = (rng.random(40) < 0.5).astype(int)
    score = y + rng.normal(size=40)
    k = 5
    rows = np.repeat(np.arange(40), k)
    by_patient = bootstrap_ci(m.auroc, y[rows], score[rows], groups=rows, n_resamples=400, seed=3)
    once = bootstrap_ci(m.auroc, y, score, n_resamples=400, seed=3)
    assert (by_patient.low, by_patient.high) == pytest.approx((once.low, once.high), abs=1e-12)
    by_row = bootstrap_ci(m.auroc, y[rows], score[rows], n_resamples=400, seed=3)
    assert by_row.high - by_row.low < 0.6 * (once.high - once.low)


def test_bootstrap_errors_are_one_clear_line():
    with pytest.raises(ValueError, match="undefined on the full data"):
        bootstrap_ci(m.auroc, [1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        bootstrap_ci(m.auroc, [0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="two strata"):
        next(bootstrap_indices(["a", "a", "b"], 5, strata=[0, 1, 1]))
    with pytest.raises(ValueError, match="groups has 2 values for 3 rows"):
        bootstrap_distribution(m.auroc, [0, 1, 1], [0.1, 0.2, 0.3], groups=["a", "b"])


def test_several_metrics_share_their_resamples():
    y, score, groups = clustered_data(seed=2)
    auroc, auprc = bootstrap_distributions([(m.auroc, (y, score)), (m.auprc, (y, score))], groups, None, 50, 9)
    alone = bootstrap_distribution(m.auroc, y, score, groups=groups, n_resamples=50, seed=9)
    np.testing.assert_allclose(auroc, alone, rtol=1e-13)  # the same draws (sums may round in another order)
    alone = bootstrap_distribution(m.auprc, y, score, groups=groups, n_resamples=50, seed=9)
    np.testing.assert_allclose(auprc, alone, rtol=1e-13)


def test_benchmark_runs_and_agrees_with_the_loop(capsys):
    from ecgfm.commands import main

    assert main(["bench", "eval", "--n", "3000", "--n_resamples", "40", "--reference_resamples", "4"]) == 0
    out = capsys.readouterr().out
    assert "bootstrap AUROC: 40 resamples of 3,000 predictions" in out
    assert "0.0e+00" in out  # the vectorised AUROCs equal the copy-and-rank loop's on the same draws


# ----------------------------------------------------------------------------------------------------- proportions


@pytest.mark.parametrize(
    "k, n, low, high",
    [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)],
)
def test_wilson_matches_newcombe_1998(k, n, low, high):
    """Newcombe RG (1998), "Two-sided confidence intervals for the single proportion: comparison of seven methods",
    Stat Med 17:857-872, Table II, method 3 (score interval without continuity correction), to 4 decimals."""
    interval = wilson_interval(k, n)
    assert (round(interval.low, 4), round(interval.high, 4)) == (low, high)
    assert interval.estimate == pytest.approx(k / n)


@pytest.mark.parametrize("k, n", [(81, 263), (15, 148), (0, 20), (1, 29), (29, 29), (3, 7)])
def test_clopper_pearson_matches_scipy(k, n):
    expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
    interval = clopper_pearson_interval(k, n, level=0.9)
    assert (interval.low, interval.high) == pytest.approx((expected.low, expected.high), abs=1e-10)


def test_proportions_of_nothing_are_nan_and_bad_counts_refused():
    assert math.isnan(wilson_interval(0, 0).low)
    assert math.isnan(clopper_pearson_interval(0, 0).high)
    with pytest.raises(ValueError, match="0 <= successes <= n"):
        wilson_interval(5, 3)


# ----------------------------------------------------------------------------------------------------- DeLong


def delong_1988_reference(y, scores):
    """DeLong, DeLong & Clarke-Pearson (1988): structural components V10(X_i) = mean_j psi(X_i, Y_j) over negatives
    Y_j and V01(Y_j) = mean_i psi(X_i, Y_j) over positives X_i, psi = 1 if X > Y, 1/2 if equal; S = S10/m + S01/n."""
    y = np.asarray(y, bool)
    aucs, v10, v01 = [], [], []
    for s in scores:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    m_, n_ = y.sum(), (~y).sum()
    s10 = np.cov(np.stack(v10))
    s01 = np.cov(np.stack(v01))
    return np.asarray(aucs), s10 / m_ + s01 / n_


def test_delong_matches_the_1988_definition_and_hanley_mcneil():
    rng = np.random.default_rng(11)
    y = rng.random(70) < 0.4
    a = np.round(y + rng.normal(size=70), 1)
    b = np.round(0.5 * y + rng.normal(size=70), 1)
    aucs, covariance = delong_covariance(y, np.stack([a, b]))
    ref_aucs, ref_cov = delong_1988_reference(y, [a, b])
    np.testing.assert_allclose(aucs, ref_aucs, atol=1e-12)
    np.testing.assert_allclose(covariance, ref_cov, atol=1e-12)
    test = delong_test(y, a, b)
    z = (ref_aucs[0] - ref_aucs[1]) / math.sqrt(ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1])
    assert test["z"] == pytest.approx(z)
    assert test["p_value"] == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert test["ci"].low < test["diff"] < test["ci"].high
    # Hanley & McNeil (1982), Radiology 143:29-36, Table 1: CT ratings of 58 normal and 51 abnormal cases, AUC 0.893
    normal, abnormal = np.repeat([1, 2, 3, 4, 5], [33, 6, 6, 11, 2]), np.repeat([1, 2, 3, 4, 5], [3, 2, 2, 11, 33])
    ct = delong_ci(np.r_[np.zeros(58), np.ones(51)], np.r_[normal, abnormal])
    assert round(ct.estimate, 3) == 0.893
    assert ct.low < 0.893 < ct.high


def test_identical_models_differ_by_nothing():
    y, score, groups = clustered_data(seed=3)
    test = delong_test(y, score, score)
    assert (test["diff"], test["z"], test["p_value"]) == (0.0, 0.0, 1.0)
    paired = paired_bootstrap(m.auroc, y, score, score, groups=groups, n_resamples=50)
    assert (paired["diff"].low, paired["diff"].high, paired["p_value"]) == (0.0, 0.0, 1.0)


def test_paired_bootstrap_uses_the_same_resamples_for_both_models():
    y, score, groups = clustered_data(seed=5)
    other = np.round(score + np.random.default_rng(0).normal(size=len(y)), 1)
    paired = paired_bootstrap(m.auroc, y, score, other, groups=groups, n_resamples=200, seed=4)
    a = bootstrap_distribution(m.auroc, y, score, groups=groups, n_resamples=200, seed=4)
    b = bootstrap_distribution(m.auroc, y, other, groups=groups, n_resamples=200, seed=4)
    diff = a - b
    assert (paired["diff"].low, paired["diff"].high) == pytest.approx(tuple(np.quantile(diff, [0.025, 0.975])))
    assert paired["p_value"] == pytest.approx(min(1.0, 2 * min((diff <= 0).mean(), (diff >= 0).mean())))
    assert paired["a"].estimate == pytest.approx(m.auroc(y, score))


# ----------------------------------------------------------------------------------------------------- thresholds


def test_choose_threshold_by_each_method():
    y = np.array([0, 0, 0, 0, 1, 0, 1, 1, 1, 1])
    score = np.array([0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert choose_threshold(y, score, "youden") == 0.6  # sens 0.8, spec 1.0
    assert choose_threshold(y, score, "balanced_accuracy") == 0.6
    assert choose_threshold(y, score, "sensitivity", 1.0) == 0.45  # the highest threshold calling every positive
    assert choose_threshold(y, score, "specificity", 0.8) == 0.45  # lowest with spec >= 0.8 (4 of 5 negatives)
    assert choose_threshold(y, score, "npv", 1.0) == 0.45  # rule-out: calls below 0.45 are all negatives
    assert choose_threshold(y, score, "ppv", 1.0) == 0.6
    assert choose_threshold(y, score, "fixed", 5.5) == 5.5
    points = operating_points(y, score)
    assert points["threshold"][0] == np.inf and points["tp"][0] == 0 and points["specificity"][0] == 1
    with pytest.raises(ValueError, match="no threshold reaches ppv >= 1.01"):
        choose_threshold(y, score, "ppv", 1.01)
    with pytest.raises(ValueError, match="needs value"):
        choose_threshold(y, score, "sensitivity")
    with pytest.raises(ValueError, match="method must be one of"):
        choose_threshold(y, score, "best")


def test_a_validation_threshold_is_applied_unchanged_to_test():
    rng = np.random.default_rng(8)
    y_val, y_test = rng.random(200) < 0.3, rng.random(300) < 0.3
    val, test = y_val + rng.normal(size=200), y_test + 0.8 * rng.normal(size=300)
    threshold = choose_threshold(y_val, val, "youden")
    assert threshold in val  # chosen among validation scores
    report = binary_report(y_test, test, threshold, n_resamples=50)
    assert report["threshold"] == threshold
    called = test >= threshold
    assert report["tp"] == int(np.sum(called & y_test)) and report["fn"] == int(np.sum(~called & y_test))
    assert choose_threshold(y_test, test, "youden") != threshold  # test's own optimum is not what is reported


def test_binary_report_intervals():
    y, score, groups = clustered_data(n_patients=40, seed=6)
    report = binary_report(y, score, 0.5, groups=groups, n_resamples=100, seed=1)
    tp, fp, fn, tn = report["tp"], report["fp"], report["fn"], report["tn"]
    assert tp + fp + fn + tn == report["n"] == len(y)
    assert report["sensitivity"] == wilson_interval(tp, tp + fn)
    assert report["npv"] == wilson_interval(tn, tn + fn)
    assert report["accuracy"] == wilson_interval(tp + tn, len(y))
    called = score >= 0.5
    assert report["mcc"] == bootstrap_ci(m.mcc, y, called, groups=groups, n_resamples=100, seed=1)
    assert report["f1"].estimate == pytest.approx(2 * tp / (2 * tp + fp + fn))
    by_patient = binary_report(y, score, 0.5, groups=groups, n_resamples=100, proportion_interval="bootstrap")
    assert "patient bootstrap" in by_patient["sensitivity"].method
    strict = binary_report(np.array([0, 1, 1]), np.array([0.5, 0.5, 0.7]), 0.5, op=">", n_resamples=10)
    assert (strict["tp"], strict["fn"], strict["tn"]) == (1, 1, 1)


def test_confusion_matrix_counts_and_row_percentages():
    out = confusion_matrix(
        ["hypo", "normal", "normal", "hyper", "normal"],
        ["hypo", "normal", "hyper", "hyper", "normal"],
        ["hypo", "normal", "hyper"],
    )
    np.testing.assert_array_equal(out["counts"], [[1, 0, 0], [0, 2, 1], [0, 0, 1]])
    np.testing.assert_allclose(out["row_percent"][1], [0, 200 / 3, 100 / 3])
    empty = confusion_matrix([0, 0], [0, 1], [0, 1, 2])
    assert np.isnan(empty["row_percent"][2]).all()
    with pytest.raises(ValueError, match="not in labels"):
        confusion_matrix([0, 3], [0, 1], [0, 1])


# ----------------------------------------------------------------------------------------------------- calibration


def test_reliability_curve_ece_and_brier_by_hand():
    y = np.array([0, 0, 1, 1, 1, 0])
    p = np.array([0.05, 0.15, 0.2, 0.8, 0.95, 1.0])
    curve = reliability_curve(y, p, n_bins=2)
    np.testing.assert_array_equal(curve["count"], [3, 3])
    np.testing.assert_allclose(curve["mean_predicted"], [0.4 / 3, 2.75 / 3])
    np.testing.assert_allclose(curve["observed"], [1 / 3, 2 / 3])
    ece = 0.5 * abs(1 / 3 - 0.4 / 3) + 0.5 * abs(2 / 3 - 2.75 / 3)
    assert expected_calibration_error(y, p, n_bins=2) == pytest.approx(ece)
    assert brier_score(y, p) == pytest.approx(np.mean((p - y) ** 2))
    quantile = reliability_curve(y, p, n_bins=3, strategy="quantile")
    np.testing.assert_array_equal(quantile["count"], [2, 2, 2])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert brier_score([0, 1], probs) == pytest.approx(((0.09 + 0.04 + 0.01) + (0.01 + 0.81 + 0.64)) / 2)
    assert expected_calibration_error([0, 1], probs, n_bins=1) == pytest.approx(abs(0.5 - 0.75))


def test_fit_temperature_recovers_the_temperature_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = 4 * rng.normal(size=20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-logits / 2.0))).astype(float)
    t = fit_temperature(logits, y, "binary")
    assert t == pytest.approx(2.0, rel=0.05)
    nll = temperature_nll(logits, y, "binary", t)
    assert nll < temperature_nll(logits, y, "binary", 1.0)
    assert nll <= min(temperature_nll(logits, y, "binary", t * f) for f in (0.99, 1.01))
    z = 2 * rng.normal(size=(6000, 3))
    p = np.exp(z / 0.8) / np.exp(z / 0.8).sum(1, keepdims=True)
    classes = (rng.random(6000)[:, None] > np.cumsum(p, 1)).sum(1)
    assert fit_temperature(z, classes, "multiclass") == pytest.approx(0.8, rel=0.05)
    assert fit_temperature(z, np.eye(3)[classes], "multiclass") == fit_temperature(z, classes, "multiclass")
    labels = np.where(rng.random((3000, 2)) < 1 / (1 + np.exp(-z[:3000, :2] / 1.5)), 1.0, 0.0)
    labels[::7, 1] = np.nan  # unlabelled entries are left out
    assert fit_temperature(z[:3000, :2], labels, "multilabel") == pytest.approx(1.5, rel=0.08)


def test_fit_temperature_refuses_an_optimum_at_a_bound():
    rng = np.random.default_rng(1)
    logits = 3 * rng.normal(size=4000)
    noise = (rng.random(4000) < 0.5).astype(float)  # labels unrelated to the logits: T runs to the upper bound
    with pytest.raises(ValueError, match=r"up to T = 20 \(the bound\) on 4000 labelled values: the logits carry no"):
        fit_temperature(logits, noise, "binary")
    separated = (logits > 0).astype(float)  # every label on its logit's side: T runs to the lower bound
    with pytest.raises(ValueError, match=r"down to T = 0.05 \(the bound\).*perfectly separated"):
        fit_temperature(logits, separated, "binary")


def test_fit_temperature_ordinal_matches_the_head():
    from ecgfm.heads.ordinal import OrdinalHead

    rng = np.random.default_rng(1)
    z = np.sort(rng.normal(size=(500, 3)) * 2, axis=1)[:, ::-1].copy()  # decreasing cumulative logits
    levels = rng.integers(0, 4, 500)
    head_nll = -OrdinalHead.log_category_probs(torch.tensor(z / 1.7)).numpy()[np.arange(500), levels].mean()
    assert temperature_nll(z, levels, "ordinal", 1.7) == pytest.approx(head_nll, rel=1e-5)
    assert 0.05 <= fit_temperature(z, levels, "ordinal") <= 20


def test_bland_altman_reproduces_the_1986_lancet_example():
    """Bland JM, Altman DG (1986), Lancet i:307-310: peak expiratory flow (l/min) by the Wright and the mini Wright
    meter in 17 people (first readings, Table 1); mean difference -2.1, SD 38.8, limits -2.1 -+ 2 SD = -79.7 and
    75.5; 95 % CI of the bias -22.0 to 17.8; of the limits -114.3 to -45.1 and 40.9 to 110.1 (from rounded
    intermediate values, hence 0.1-0.2 of tolerance)."""
    wright = [494, 395, 516, 434, 476, 557, 413, 442, 650, 433, 417, 656, 267, 478, 178, 423, 427]
    mini = [512, 430, 520, 428, 500, 600, 364, 380, 658, 445, 432, 626, 260, 477, 259, 350, 451]
    agreement = bland_altman(wright, mini, limits_z=2.0)
    assert agreement["n"] == 17
    assert round(agreement["bias"], 1) == -2.1 and round(agreement["sd"], 1) == 38.8
    assert (agreement["loa_low"], agreement["loa_high"]) == pytest.approx((-79.7, 75.5), abs=0.1)
    assert (agreement["bias_ci"].low, agreement["bias_ci"].high) == pytest.approx((-22.0, 17.8), abs=0.1)
    assert (agreement["loa_low_ci"].low, agreement["loa_low_ci"].high) == pytest.approx((-114.3, -45.1), abs=0.2)
    assert (agreement["loa_high_ci"].low, agreement["loa_high_ci"].high) == pytest.approx((40.9, 110.1), abs=0.2)
    default = bland_altman(wright, mini)
    assert default["loa_high"] == pytest.approx(default["bias"] + 1.959964 * default["sd"])


def test_regression_cut_off_report_classifies_both_values():
    true = np.array([4.0, 5.6, 6.1, 5.4, 5.8, 3.9, 5.0, 7.0])
    pred = np.array([4.2, 5.7, 5.2, 5.6, 6.0, 4.1, 4.8, 6.5])
    report = regression_threshold_report(pred, true, 5.5, ">", n_resamples=50)
    # measured > 5.5: rows 1, 2, 4, 7; predicted > 5.5: rows 1, 3, 4, 7
    assert (report["tp"], report["fp"], report["fn"], report["tn"]) == (3, 1, 1, 3)
    assert report["sensitivity"] == wilson_interval(3, 4)
    assert report["auroc"].estimate == pytest.approx(m.auroc(true > 5.5, pred))
    low = regression_threshold_report(pred, true, 4.5, "<", n_resamples=50)
    assert (low["tp"], low["fn"], low["fp"]) == (2, 0, 0)


# ----------------------------------------------------------------------------------------------------- heads


HEADS = [
    {"kind": "binary", "name": "arrest", "labels": ["arrest"]},
    {"kind": "multilabel", "name": "dx", "labels": ["AF", "SR", "LBBB"]},
    {"kind": "multiclass", "name": "electrolyte", "labels": ["hypo", "normal", "hyper"]},
    {"kind": "ordinal", "name": "triage", "labels": ["normal", "not acute", "subacute", "acute"]},
]


def _built(spec):
    from ecgfm.heads.base import create_head

    torch.manual_seed(0)
    head = create_head(spec)
    head.build(8, spec["labels"])
    return head.eval()


@pytest.mark.parametrize("spec", HEADS, ids=lambda s: s["kind"])
def test_temperature_softens_probabilities_and_keeps_every_decision(spec):
    from ecgfm.decisions import apply_decisions

    head = _built(spec)
    if spec["kind"] == "binary":
        head.threshold.fill_(0.3)
    if spec["kind"] == "multilabel":
        head.decision_logit.copy_(torch.tensor([-0.4, 0.1, 0.9]))
    x = torch.randn(64, 8) * 3
    with torch.no_grad():
        before = head.postprocess(head(x))
        head.set_temperature(2.5)
        after = head.postprocess(head(x))
    scores = head.score_names()
    decided = [name for name in before if name not in scores]
    for name in decided:  # calls, classes and levels do not move
        torch.testing.assert_close(after[name], before[name])
    assert any(not torch.allclose(after[name], before[name]) for name in scores)
    rules = apply_decisions({k: after[k].numpy() for k in scores}, head.decision_rules())
    for name, values in rules.items():  # the rules on tempered probabilities decide as postprocess does
        np.testing.assert_array_equal(values, after[name].numpy().astype(np.float32), err_msg=name)
    if spec["kind"] == "binary":
        torch.testing.assert_close(after["p_arrest"], torch.sigmoid(head(x).reshape(-1) / 2.5))
    with pytest.raises(ValueError, match="positive number"):
        head.set_temperature(0)


def test_a_checkpoint_without_temperature_still_loads_strictly():
    from ecgfm.backbones.checkpoint import load_strict
    from ecgfm.heads.regression import RegressionHead

    head = _built(HEADS[1])
    head.set_temperature(3.0)
    old = {k: v for k, v in head.state_dict().items() if k != "temperature"}
    fresh = _built(HEADS[1])
    fresh.set_temperature(2.0)
    fresh.load_state_dict(old)  # strict: what Lightning does with an older .ckpt
    assert float(fresh.temperature) == 1.0
    other = _built(HEADS[1])
    load_strict(other, old, "an older model")
    assert float(other.temperature) == 1.0
    with pytest.raises(Exception, match="missing keys.*classifier"):
        load_strict(other, {k: v for k, v in old.items() if not k.startswith("classifier")}, "a broken model")
    regression = RegressionHead(name="k", labels=["potassium"])
    regression.build(8, ["potassium"])
    assert not hasattr(regression, "temperature")
    with pytest.raises(ValueError, match="no temperature"):
        regression.set_temperature(2.0)


def test_the_published_model_in_checkpoints_loads_with_temperature_one():
    import ecgfm
    from ecgfm.resources import checkpoints_dir

    model = ecgfm.load(checkpoints_dir() / "ludb-diagnoses-net1d-small")
    assert all(float(head.temperature) == 1.0 for head in model.heads.values() if hasattr(head, "temperature"))
