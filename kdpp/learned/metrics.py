r"""Metrics of generated digits in a fixed classifier's features.

- Frechet distance (FD): ``|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` between Gaussian
  fits of the classifier's penultimate features (the FID recipe with the digits classifier in
  place of Inception);
- requested-class accuracy: how often the classifier recognises the class that was asked for
  (the alignment analogue of the paper's ImageReward / PickScore);
- class-histogram TV: total variation between the histogram of predicted classes and the target
  histogram (the requested labels', or the real data's for unconditional samples).

Uncertainty is over seeds: :func:`mean_ci` is a t-interval of per-seed values, and a difference
between two samplers is computed per seed (same initial noise: paired) before the interval.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy import linalg, stats
from torch import Tensor

from ..toy.metrics import Estimate
from .data import N_CLASSES
from .nets import DigitsClassifier, check_labels


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FD between Gaussian fits of two feature sets (rows = samples), in float64."""
    a, b = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca + cb - 2 * root.real))


def histogram(classes: Tensor) -> Tensor:
    """Class frequencies (``[10]``, summing to 1) of integer labels."""
    return torch.bincount(classes, minlength=N_CLASSES).double() / len(classes)


def mean_ci(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean of per-seed values with a Student-t interval.

    One value (one seed) has no spread to estimate: its interval is undefined, ``low = high = nan``
    (never a zero-width interval).
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0:
        raise ValueError(f"values must be a non-empty sequence of numbers (one per seed), got {values!r}")
    m = float(v.mean())
    if len(v) < 2:
        return Estimate(m, float("nan"), float("nan"))
    half = float(stats.t.ppf((1 + level) / 2, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))
    return Estimate(m, m - half, m + half)


class DigitsMetrics:
    """FD, requested-class accuracy and class-histogram TV against the real digits.

    FD fits a covariance of the classifier's ``F`` features (64 for the shipped one), which has rank
    at most ``n - 1`` from ``n`` samples: every sample set (``real``, the samples scored, each half
    in :meth:`real_floor`) needs at least ``F + 1`` rows (:meth:`min_samples`), else FD is meaningless.

    Args:
        classifier: the fixed :class:`~kdpp.learned.nets.DigitsClassifier`.
        real: the real digits ``[N, 64]`` (the FD reference) and ``real_labels`` their classes.
    """

    def __init__(self, classifier: DigitsClassifier, real: Tensor, real_labels: Tensor):
        self.classifier = classifier
        self._check_samples(real, "real")
        check_labels(real_labels, "real_labels", len(real), allow_null=False)
        self.real_features = self.features(real)
        self.real_hist = histogram(real_labels)

    def min_samples(self) -> int:
        """The fewest samples FD accepts: the classifier's feature dimension + 1 (a full-rank covariance)."""
        return self.classifier.config["features"] + 1

    def _check_samples(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(f"{name} must be a [N, 64] tensor of digits, got {getattr(x, 'shape', x)!r}")
        if len(x) < self.min_samples():
            raise ValueError(f"{name} has {len(x)} samples; FD needs at least {self.min_samples()} (the classifier's "
                             f"{self.min_samples() - 1} features + 1, for a full-rank covariance)")

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        return self.classifier.features(x.float()).double()

    @torch.no_grad()
    def __call__(self, x: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        """``{"fd", "tv", "acc"}`` of samples ``x`` (``acc`` only when the requested ``labels`` are given)."""
        self._check_samples(x, "x")
        if labels is not None:
            check_labels(labels, "labels", len(x), allow_null=False)
        feats = self.features(x)
        pred = self.classifier.head(feats.to(self.classifier.head.weight.dtype)).argmax(1)
        target = self.real_hist if labels is None else histogram(labels)
        out = {"fd": frechet_distance(feats, self.real_features),
               "tv": float(0.5 * (histogram(pred) - target).abs().sum())}
        if labels is not None:
            out["acc"] = float((pred == labels).double().mean())
        return out

    def real_floor(self, real: Tensor, seed: int) -> float:
        """FD between two disjoint random halves of ``real``: the sampling-noise floor of FD."""
        if len(real) < 2 * self.min_samples():
            raise ValueError(f"real has {len(real)} samples; real_floor needs at least {2 * self.min_samples()} "
                             f"(two halves of {self.min_samples()}, the least FD accepts)")
        perm = torch.randperm(len(real), generator=torch.Generator().manual_seed(seed))
        half = len(real) // 2
        return frechet_distance(self.features(real[perm[:half]]), self.features(real[perm[half:]]))


@torch.no_grad()
def class_accuracy(classifier: DigitsClassifier, x: Tensor, labels: Tensor) -> float:
    """Fraction of samples ``x`` that ``classifier`` assigns to their requested ``labels``."""
    check_labels(labels, "labels", len(x), allow_null=False)
    return float((classifier(x.float()).argmax(1) == labels).double().mean())
