"""Distribution metrics with bootstrap intervals.

Every metric returns an :class:`Estimate`: the value on the full samples and a
percentile bootstrap interval (samples resampled with replacement, each set
independently; random projections / bandwidths held fixed across resamples).

The distances (sliced and exact W2, and MMD on resamples, which repeat points)
are biased estimators: two samples of one distribution are at a positive
distance, resampling adds duplicates and more distance, so their percentile
intervals are asymmetric and describe the spread of the estimator, not a
confidence interval for the distance between the distributions. To compare two
samplers, score both against one reference sample with :func:`paired_difference`.
"""
from __future__ import annotations

import inspect
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .mixture import GaussianMixture


class Estimate(NamedTuple):
    """A metric value with its bootstrap interval ``[low, high]`` (not symmetric about ``value`` in general)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3g} [{self.low:.3g}, {self.high:.3g}]"


def _check_bootstrap(n_boot: int, level: float) -> None:
    if not (isinstance(n_boot, int) and n_boot >= 0):
        raise ValueError(f"n_boot must be an integer >= 0, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def _percentile(value: float, draws: Sequence[float], level: float) -> Estimate:
    if not draws:
        return Estimate(value, value, value)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(lo), float(hi))


def bootstrap(stat: Callable[..., float], *samples: Tensor, n_boot: int = 200, level: float = 0.95,
              seed: int = 0, transform: Callable[[Tensor], Tensor] = lambda t: t) -> Estimate:
    """``stat(*samples)`` with a percentile bootstrap interval at ``level``.

    Each sample (rows = observations) is resampled independently; ``transform``
    maps a (resampled) sample to the argument ``stat`` takes.
    """
    _check_bootstrap(n_boot, level)
    g = torch.Generator().manual_seed(seed)
    value = float(stat(*(transform(s) for s in samples)))
    draws = []
    for _ in range(n_boot):
        resampled = [transform(s[_draw(len(s), g).to(s.device)]) for s in samples]
        draws.append(float(stat(*resampled)))
    return _percentile(value, draws, level)


def _draw(n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, n, (n,), generator=g)


def paired_difference(metric: Callable[..., Estimate | float], x: Tensor, y: Tensor, reference: Tensor, *,
                      paired: bool = True, n_boot: int = 200, level: float = 0.95, seed: int = 0,
                      **options) -> Estimate:
    r"""``metric(x, reference) - metric(y, reference)`` with a percentile bootstrap interval.

    The way to compare two samplers (``x`` and ``y``) on a distance: both are
    scored against the *same* reference sample, so its noise and most of the
    estimator's bias cancel in the difference. Each bootstrap draw resamples the
    reference once for both terms and, with ``paired=True``, ``x`` and ``y``
    with the same indices: rows ``x[i]`` and ``y[i]`` come from the same initial
    (and solver) noise, as when both samplers start from one seeded ``x_T``.
    ``paired=False`` resamples ``x`` and ``y`` independently (unrelated samples).

    ``metric(a, b, **options)`` returns an :class:`Estimate` or a float; kdpp's
    metrics are called with ``n_boot=0`` (the bootstrap is done here). A metric
    with a data-dependent parameter must have it fixed so both terms use one
    metric: :func:`mmd_rbf` needs ``bandwidth=``. Negative: ``x`` is closer.
    """
    _check_bootstrap(n_boot, level)
    if metric is mmd_rbf and options.get("bandwidth") is None:
        raise ValueError("paired_difference(mmd_rbf, ...) needs bandwidth=...: the median heuristic would give "
                         "the two terms different kernels")
    if paired and len(x) != len(y):
        raise ValueError(f"paired=True needs x and y of equal length (row i of each from the same noise), got "
                         f"{len(x)} and {len(y)}; pass paired=False for unrelated samples")
    if "n_boot" in inspect.signature(metric).parameters:
        options["n_boot"] = 0

    def difference(a: Tensor, b: Tensor, ref: Tensor) -> float:
        va, vb = metric(a, ref, **options), metric(b, ref, **options)
        return float(getattr(va, "value", va)) - float(getattr(vb, "value", vb))

    g = torch.Generator().manual_seed(seed)
    draws = []
    for _ in range(n_boot):
        i = _draw(len(x), g)
        j = i if paired else _draw(len(y), g)
        r = _draw(len(reference), g)
        draws.append(difference(x[i.to(x.device)], y[j.to(y.device)], reference[r.to(reference.device)]))
    return _percentile(difference(x, y, reference), draws, level)


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).double()


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 128, seed: int = 0, n_boot: int = 100) -> Estimate:
    r"""Sliced 2-Wasserstein distance ``sqrt(E_theta W2^2(theta.x, theta.y))`` over random unit directions.

    Unequal sample sizes are compared through the quantile functions at
    ``max(n, m)`` mid-points.
    """
    x, y = _flat(x), _flat(y)
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], n_projections, generator=g, dtype=torch.float64).to(x.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, py = (x @ theta).T.contiguous(), (y @ theta).T.contiguous()  # [projections, n]: sort along the last dim

    def quantiles(p: Tensor, n: int) -> Tensor:
        p = p.sort(dim=1).values
        if p.shape[1] == n:
            return p
        pos = ((torch.arange(n, dtype=p.dtype, device=p.device) + 0.5) / n * p.shape[1] - 0.5).clamp(0, p.shape[1] - 1)
        lo = pos.floor().long()
        hi = (lo + 1).clamp(max=p.shape[1] - 1)
        return p[:, lo] + (pos - lo) * (p[:, hi] - p[:, lo])

    def stat(a: Tensor, b: Tensor) -> float:
        n = max(a.shape[1], b.shape[1])
        return float(((quantiles(a, n) - quantiles(b, n)) ** 2).mean().sqrt())

    return bootstrap(stat, px.T, py.T, n_boot=n_boot, seed=seed, transform=lambda t: t.T)


def wasserstein2(x: Tensor, y: Tensor, n_boot: int = 50, seed: int = 0) -> Estimate:
    """Exact 2-Wasserstein distance between two equal-size empirical samples (an assignment problem; n <= ~2000)."""
    x, y = _flat(x), _flat(y)
    if len(x) != len(y):
        raise ValueError(f"wasserstein2 needs equal sample sizes, got {len(x)} and {len(y)}")

    def stat(a: Tensor, b: Tensor) -> float:
        cost = torch.cdist(a, b).pow(2).cpu().numpy()
        rows, cols = linear_sum_assignment(cost)
        return float(np.sqrt(cost[rows, cols].mean()))

    return bootstrap(stat, x, y, n_boot=n_boot, seed=seed)


def mmd_rbf(x: Tensor, y: Tensor, bandwidth: float | None = None, n_boot: int = 200, seed: int = 0,
            max_n: int = 2000) -> Estimate:
    r"""Unbiased squared MMD with the RBF kernel ``exp(-|a-b|^2 / (2 h^2))`` (median heuristic ``h`` by default).

    The kernel matrix is computed once and the bootstrap resamples its rows and
    columns; samples larger than ``max_n`` are subsampled (without replacement).
    """
    g = torch.Generator().manual_seed(seed)
    x, y = (_flat(t)[torch.randperm(len(t), generator=g)[:max_n].to(t.device)] for t in (x, y))
    both = torch.cat([x, y])
    dist2 = torch.cdist(both, both).pow(2)
    if bandwidth is None:
        bandwidth = float(dist2[:1000, :1000].sqrt().median()) or 1.0
    kernel = torch.exp(-dist2 / (2 * bandwidth**2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]

    def stat(wa: Tensor, wb: Tensor) -> float:
        # wa, wb: how often each point was drawn; the U-statistic drops only the p = q draws
        aa = (wa @ kxx @ wa - (wa * kxx.diagonal()).sum()) / (n * (n - 1))
        bb = (wb @ kyy @ wb - (wb * kyy.diagonal()).sum()) / (m * (m - 1))
        return float(aa + bb - 2 * (wa @ kxy @ wb) / (n * m))

    counts = lambda idx: torch.bincount(idx, minlength=len(idx)).to(kernel.dtype)
    return bootstrap(stat, torch.arange(n), torch.arange(m), n_boot=n_boot, seed=seed, transform=counts)


def nll(x: Tensor, mixture: GaussianMixture, n_boot: int = 200, seed: int = 0) -> Estimate:
    """Mean negative log-likelihood of the samples under the true mixture (precision / sharpness)."""
    logp = mixture.log_prob(x.to(mixture.means.dtype))
    return bootstrap(lambda lp: float(-lp.mean()), logp, n_boot=n_boot, seed=seed)


def mode_masses(x: Tensor, mixture: GaussianMixture) -> Tensor:
    """Fraction of the samples assigned (most responsible component, at sigma = 0) to each mode."""
    labels = mixture.responsibilities(x.to(mixture.means.dtype)).argmax(1)
    return torch.bincount(labels, minlength=mixture.K).double() / len(x)


def mode_coverage(x: Tensor, mixture: GaussianMixture, n_boot: int = 200, seed: int = 0) -> Estimate:
    """Total-variation distance between the samples' mass per mode and the true weights (0: perfect)."""
    labels = mixture.responsibilities(x.to(mixture.means.dtype)).argmax(1)
    weights = mixture.weights.cpu()

    def stat(lab: Tensor) -> float:
        mass = torch.bincount(lab.cpu(), minlength=mixture.K).double() / len(lab)
        return float(0.5 * (mass - weights).abs().sum())

    return bootstrap(stat, labels, n_boot=n_boot, seed=seed)
