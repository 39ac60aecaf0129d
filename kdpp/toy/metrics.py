"""Distribution metrics with bootstrap confidence intervals.

Every metric returns an :class:`Estimate`: the value on the full samples and a
percentile bootstrap interval (samples resampled with replacement, each set
independently; random projections / bandwidths held fixed across resamples).
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .mixture import GaussianMixture


class Estimate(NamedTuple):
    """A metric value with its bootstrap confidence interval ``[low, high]``."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        half = (self.high - self.low) / 2
        return f"{self.value:.4g} ± {half:.2g}"


def bootstrap(stat: Callable[..., float], *samples: Tensor, n_boot: int = 200, level: float = 0.95,
              seed: int = 0, transform: Callable[[Tensor], Tensor] = lambda t: t) -> Estimate:
    """``stat(*samples)`` with a percentile bootstrap interval at ``level``.

    Each sample (rows = observations) is resampled independently; ``transform``
    maps a (resampled) sample to the argument ``stat`` takes.
    """
    g = torch.Generator().manual_seed(seed)
    value = float(stat(*(transform(s) for s in samples)))
    draws = []
    for _ in range(n_boot):
        resampled = [transform(s[torch.randint(0, len(s), (len(s),), generator=g).to(s.device)]) for s in samples]
        draws.append(float(stat(*resampled)))
    if not draws:
        return Estimate(value, value, value)
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(value, float(lo), float(hi))


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
