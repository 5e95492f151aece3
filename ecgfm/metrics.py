"""Metrics torchmetrics lacks: polytomous discrimination index, ordinal concordance, confusion-matrix statistics,
and streaming metrics whose memory does not grow with the number of samples (binned scores, per-column errors).

The functions take numpy arrays (they run once per epoch on gathered results); the ``Metric`` classes hold summed
states, so under DDP torchmetrics adds them across ranks before ``compute``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# ---------------------------------------------------------------------------------------------------------- ordinal


def polytomous_discrimination_index(probs: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Polytomous discrimination index (Van Calster et al., Eur J Epidemiol 2012) and its per-category terms.

    For every set of K cases, one from each category, the case from category k "wins" when its predicted
    probability of k is the highest of the K cases; PDI_k is the share of sets it wins and PDI the mean over
    categories (1 = perfect, 1/K = no discrimination). A case tied with m others shares the win: it gets
    1 / (m + 1), so constant predictions give exactly 1/K. Exact and O(K^2 N log N): for each case of k and each
    other category j, the counts of j-cases below and tied with it form the polynomial prod_j (below_j + tied_j z)
    whose z^m coefficient counts the sets with m ties.

    Args:
        probs: [N, K] predicted probabilities (any score where higher means "more likely this category").
        labels: [N] true categories 0..K-1; every category needs at least one case.
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"probs must be [N, K] and labels [N]; got {probs.shape} and {labels.shape}")
    k_classes = probs.shape[1]
    counts = np.bincount(labels, minlength=k_classes)
    if len(counts) > k_classes or (counts == 0).any():
        raise ValueError(f"the PDI needs at least one case of each of the {k_classes} categories; counts {counts}")
    per_class = np.empty(k_classes)
    for k in range(k_classes):
        own = probs[labels == k, k]
        poly = np.ones((len(own), 1))  # coefficients of z^0 .. z^m, one row per case of category k
        for j in range(k_classes):
            if j == k:
                continue
            others = np.sort(probs[labels == j, k])
            below = np.searchsorted(others, own, side="left").astype(np.float64)
            tied = np.searchsorted(others, own, side="right") - below
            nxt = np.zeros((len(own), poly.shape[1] + 1))
            nxt[:, :-1] += poly * below[:, None]
            nxt[:, 1:] += poly * tied[:, None]
            poly = nxt
        credit = poly @ (1.0 / np.arange(1, poly.shape[1] + 1))
        per_class[k] = credit.sum() / np.prod(counts.astype(np.float64))
    return float(per_class.mean()), per_class


def _mann_whitney(lower: np.ndarray, upper: np.ndarray) -> float:
    """Pairs (a from lower, b from upper) with score_b > score_a, ties counted 1/2."""
    lower = np.sort(lower)
    below = np.searchsorted(lower, upper, side="left")
    tied = np.searchsorted(lower, upper, side="right") - below
    return float(below.sum() + 0.5 * tied.sum())


def ordinal_concordance(scores: np.ndarray, labels: np.ndarray, average: str = "pairs") -> float:
    """Concordance of a score with an ordinal outcome: over pairs of cases in different categories, the share
    where the higher category has the higher score (ties in the score count 1/2; pairs in one category are skipped).

    ``average="pairs"`` is Harrell's c for an ordinal outcome (every pair weighs the same; van de Leur et al. 2020
    report 0.93 for triage); ``average="categories"`` is Van Calster's ordinal c-index (ORC: the mean of the
    pairwise AUROCs over the K(K-1)/2 category pairs). 1 = perfect ranking, 0.5 = none.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).astype(np.int64).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} differ in length")
    if average not in ("pairs", "categories"):
        raise ValueError(f"average must be 'pairs' or 'categories', got {average!r}")
    present = np.unique(labels)
    if len(present) < 2:
        return float("nan")
    wins, pairs, aucs = 0.0, 0.0, []
    groups = {c: scores[labels == c] for c in present}
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            u = _mann_whitney(groups[a], groups[b])
            n = float(len(groups[a]) * len(groups[b]))
            wins, pairs = wins + u, pairs + n
            aucs.append(u / n)
    return wins / pairs if average == "pairs" else float(np.mean(aucs))


# ---------------------------------------------------------------------------------------------------------- confusion


def confusion_statistics(confusion: np.ndarray) -> dict[str, np.ndarray | float]:
    """Accuracy, multi-class MCC (Gorodkin 2004) and one-vs-rest sensitivity, specificity, PPV, NPV and F1 per
    category, from a confusion matrix with true categories in rows and predictions in columns (NaN where a
    denominator is 0)."""
    c = np.asarray(confusion, dtype=np.float64)
    total = c.sum()
    tp = np.diag(c)
    true_n, pred_n = c.sum(1), c.sum(0)
    fn, fp = true_n - tp, pred_n - tp
    tn = total - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        sens = tp / (tp + fn)
        spec = tn / (tn + fp)
        ppv = tp / (tp + fp)
        npv = tn / (tn + fn)
        f1 = 2 * tp / (2 * tp + fp + fn)
        accuracy = tp.sum() / total
        mcc_den = np.sqrt((total**2 - (pred_n**2).sum()) * (total**2 - (true_n**2).sum()))
        mcc = (tp.sum() * total - (pred_n * true_n).sum()) / mcc_den
    return {
        "accuracy": float(accuracy),
        "mcc": float(mcc),
        "sensitivity": sens,
        "specificity": spec,
        "ppv": ppv,
        "npv": npv,
        "f1": f1,
    }


# ---------------------------------------------------------------------------------------------------------- streaming


class BinnedScores(Metric):
    """Per-column histograms of the scores of positives and negatives over fixed bins.

    Memory is ``columns x 2 x bins`` counts whatever the number of samples (1,200 labels x 1,024 bins = 20 MB), and
    an update is one ``bincount``. AUROC, average precision, prevalence and decision thresholds come from the
    histograms; scores in one bin count as ties. Scores are logits by default (bins uniform over [-16, 16]), which
    resolves rare labels' small probabilities better than bins over [0, 1].
    """

    full_state_update = False

    def __init__(self, num_columns: int, bins: int = 1024, low: float = -16.0, high: float = 16.0):
        super().__init__()
        if bins < 2 or not high > low:
            raise ValueError(f"need bins >= 2 and high > low; got bins={bins}, low={low}, high={high}")
        self.num_columns, self.bins, self.low, self.high = num_columns, bins, low, high
        self.add_state("hist", torch.zeros(num_columns, 2, bins, dtype=torch.long), dist_reduce_fx="sum")

    def first_bin_at(self, threshold: Tensor) -> Tensor:
        """Per column, the first bin whose left edge is >= ``threshold`` (bins from there on are called positive)."""
        position = (threshold.float() - self.low) * (self.bins / (self.high - self.low))
        nearest = position.round()
        position = torch.where((position - nearest).abs() < 1e-3, nearest, position.ceil())  # an edge stays itself
        return position.clamp(0, self.bins).long()

    def edges(self) -> Tensor:
        """Left edge of each bin: a threshold at edge b calls bins b.. positive."""
        return torch.linspace(self.low, self.high, self.bins + 1)[:-1]

    def update(self, scores: Tensor, target: Tensor, mask: Tensor) -> None:
        """scores, target (0/1), mask: [N, columns]; masked-out entries are not counted.

        One int32 index per entry (column, class, bin), masked entries sent to a spare slot: no [N, C] int64
        tensors and no boolean indexing, which made the update 2-3x slower at 1,200 labels (ecgfm bench metrics).
        """
        n = len(scores)
        scores, target, mask = scores.reshape(n, -1), target.reshape(n, -1), mask.reshape(n, -1)
        slots = self.hist.numel()
        position = scores.float().sub(self.low).mul_(self.bins / (self.high - self.low))
        flat = position.nan_to_num_(0.0).clamp_(0, self.bins - 1).to(torch.int32)
        flat += torch.arange(self.num_columns, dtype=torch.int32, device=flat.device).mul_(2 * self.bins)
        flat += (target <= 0.5).to(torch.int32).mul_(self.bins)  # class slot 0 = positives, 1 = negatives
        flat.masked_fill_(~mask, slots)
        self.hist += torch.bincount(flat.view(-1), minlength=slots + 1)[:slots].view_as(self.hist)

    def compute(self) -> Tensor:
        return self.hist

    # Everything below works on ``compute()``'s [C, 2, bins] counts.
    @staticmethod
    def totals(hist: Tensor) -> tuple[Tensor, Tensor]:
        """Positives and negatives per column."""
        return hist[:, 0].sum(-1), hist[:, 1].sum(-1)

    @staticmethod
    def auroc(hist: Tensor) -> Tensor:
        """[C] AUROC (NaN where a column lacks positives or negatives)."""
        pos, neg = hist[:, 0].double(), hist[:, 1].double()
        neg_below = neg.cumsum(-1) - neg
        wins = (pos * (neg_below + 0.5 * neg)).sum(-1)
        return (wins / (pos.sum(-1) * neg.sum(-1))).float()

    @staticmethod
    def average_precision(hist: Tensor) -> Tensor:
        """[C] average precision (area under the step precision-recall curve, as scikit-learn's)."""
        pos, neg = hist[:, 0].double(), hist[:, 1].double()
        tp = pos.flip(-1).cumsum(-1).flip(-1)  # positives at or above each bin
        fp = neg.flip(-1).cumsum(-1).flip(-1)
        precision = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        return ((pos * precision).sum(-1) / pos.sum(-1)).float()

    @staticmethod
    def rates_at(hist: Tensor, first_positive_bin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sensitivity, specificity and precision per column when bins >= ``first_positive_bin`` are called positive."""
        pos, neg = hist[:, 0].double(), hist[:, 1].double()
        bins = torch.arange(hist.shape[-1], device=hist.device)
        called = bins[None, :] >= first_positive_bin[:, None]
        tp, fp = (pos * called).sum(-1), (neg * called).sum(-1)
        p, n = pos.sum(-1), neg.sum(-1)
        return (tp / p).float(), ((n - fp) / n).float(), (tp / (tp + fp)).float()

    @staticmethod
    def best_bins(hist: Tensor, criterion: str = "balanced_accuracy") -> Tensor:
        """Per column, the first positive bin that maximises balanced accuracy (or F1); ties go to the lowest."""
        return BinnedScores.criterion_by_bin(hist, criterion).argmax(-1)

    @staticmethod
    def criterion_by_bin(hist: Tensor, criterion: str = "balanced_accuracy") -> Tensor:
        """[C, bins] balanced accuracy (or F1) when bins >= b are called positive."""
        pos, neg = hist[:, 0].double(), hist[:, 1].double()
        tp = pos.flip(-1).cumsum(-1).flip(-1)
        fp = neg.flip(-1).cumsum(-1).flip(-1)
        p, n = pos.sum(-1, keepdim=True).clamp(min=1), neg.sum(-1, keepdim=True).clamp(min=1)
        if criterion == "balanced_accuracy":
            value = 0.5 * (tp / p + (n - fp) / n)
        elif criterion == "f1":
            value = 2 * tp / (tp + fp + p)
        else:
            raise ValueError(f"criterion must be 'balanced_accuracy' or 'f1', got {criterion!r}")
        return value


class ColumnErrors(Metric):
    """Streaming per-column sums for MAE, RMSE, Pearson r and the MAE of a constant reference prediction.

    Float64 sums over masked entries only, so memory is a few vectors of length ``columns``.
    """

    full_state_update = False
    _FIELDS = ("n", "abs", "sq", "ref_abs", "x", "y", "xx", "yy", "xy")

    def __init__(self, num_columns: int):
        super().__init__()
        for field in self._FIELDS:
            self.add_state(field, torch.zeros(num_columns, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor, mask: Tensor, reference: Tensor | None = None) -> None:
        """prediction, target, mask: [N, C]; reference: [C] constant prediction (e.g. the training mean)."""
        m = mask.double()
        x = torch.where(mask, prediction.double(), 0.0)
        y = torch.where(mask, target.double(), 0.0)
        err = x - y
        self.n += m.sum(0)
        self.abs += err.abs().sum(0)
        self.sq += err.square().sum(0)
        if reference is not None:
            self.ref_abs += ((reference.double()[None, :] - y).abs() * m).sum(0)
        self.x += x.sum(0)
        self.y += y.sum(0)
        self.xx += x.square().sum(0)
        self.yy += y.square().sum(0)
        self.xy += (x * y).sum(0)

    def compute(self) -> dict[str, Tensor]:
        n = self.n
        with torch.no_grad():
            cov = n * self.xy - self.x * self.y
            var_x, var_y = n * self.xx - self.x.square(), n * self.yy - self.y.square()
            pearson = cov / (var_x * var_y).sqrt()
            safe_n = n.clamp(min=1)
            nan = torch.full_like(n, float("nan"))
            return {
                "n": n,
                "mae": torch.where(n > 0, self.abs / safe_n, nan).float(),
                "rmse": torch.where(n > 0, (self.sq / safe_n).sqrt(), nan).float(),
                "mae_reference": torch.where(n > 0, self.ref_abs / safe_n, nan).float(),
                "pearson": torch.where(n > 2, pearson, nan).float(),
            }


class ConfusionCounts(Metric):
    """A summed K x K confusion matrix, true categories in rows and predictions in columns (DDP adds it up)."""

    full_state_update = False

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.add_state("counts", torch.zeros(num_classes, num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predicted: Tensor, true: Tensor) -> None:
        """predicted, true: [N] category indices of the labelled rows."""
        k = self.num_classes
        flat = true.long().reshape(-1) * k + predicted.long().reshape(-1)
        self.counts += torch.bincount(flat, minlength=k * k).view(k, k)

    def compute(self) -> Tensor:
        return self.counts


class StoredScores(Metric):
    """Keeps every (score row, label) of an epoch, for statistics with no bounded form (PDI, ordinal concordance).

    Memory grows with the samples: 4 categories cost 20 bytes a segment, 20 MB per million.
    """

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("labels", [], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor) -> None:
        self.scores.append(scores.float())
        self.labels.append(labels.long())

    def compute(self) -> tuple[Tensor, Tensor]:
        if not self.scores or (isinstance(self.scores, list) and not len(self.scores)):
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return dim_zero_cat(self.scores), dim_zero_cat(self.labels)


__all__ = [
    "BinnedScores",
    "ColumnErrors",
    "ConfusionCounts",
    "StoredScores",
    "confusion_statistics",
    "ordinal_concordance",
    "polytomous_discrimination_index",
]
