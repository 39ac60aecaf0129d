"""Named mixtures shared by the tests, the demo and the benchmarks."""
from __future__ import annotations

import math

import torch

from .mixture import GaussianMixture


def ring(n_modes: int = 8, radius: float = 4.0, std: float = 0.25, **kw) -> GaussianMixture:
    """2-D: ``n_modes`` equal isotropic modes evenly spaced on a circle."""
    angle = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    return GaussianMixture(torch.stack([radius * angle.cos(), radius * angle.sin()], 1), std, **kw)


def grid(side: int = 4, spacing: float = 2.5, std: float = 0.2, **kw) -> GaussianMixture:
    """2-D: a ``side x side`` grid of equal isotropic modes centred on 0."""
    axis = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(axis, axis)
    return GaussianMixture(means, std, **kw)


def high_dim(d: int = 16, n_modes: int = 6, scale: float = 3.0, seed: int = 0, **kw) -> GaussianMixture:
    """d-D: ``n_modes`` random modes (means ~ N(0, scale^2 / d * d)), diagonal stds in [0.3, 0.8], unequal weights."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(n_modes, d, generator=g, dtype=torch.float64) * scale
    stds = 0.3 + 0.5 * torch.rand(n_modes, d, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(n_modes, generator=g, dtype=torch.float64)
    return GaussianMixture(means, stds, weights, **kw)


def gaussian(d: int = 2, mean: float = 1.0, std: float = 0.5, **kw) -> GaussianMixture:
    """One isotropic Gaussian ``N(mean * 1, std^2 I)``: every step has a closed form."""
    return GaussianMixture(torch.full((1, d), mean, dtype=torch.float64), std, **kw)


DISTRIBUTIONS = {"ring": ring, "grid": grid, "high_dim": high_dim, "gaussian": gaussian}
