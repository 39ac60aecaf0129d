"""Gaussian mixtures with exact VE denoisers, scores, densities and flow maps."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .._shape import per_sample


def _sigma_column(sigma: float | Tensor, x: Tensor) -> Tensor:
    """``sigma`` (a float, 0-d tensor or one value per row) as an ``[n, 1]`` column."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return s.reshape(-1, 1).expand(x.shape[0], 1) if s.numel() == 1 else s.reshape(x.shape[0], 1)


class GaussianMixture:
    r"""``p(x0) = sum_k w_k N(x0; mu_k, diag(s_k^2))`` in ``d`` dimensions.

    Under VE noising ``x = x0 + sigma * eps`` every component stays Gaussian,
    ``N(mu_k, C_k + sigma^2 I)``, so the noised density, its score and the
    posterior mean ``E[x0 | x]`` are exact:

        D(x, sigma) = sum_k r_k(x) * (mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k))

    with ``r_k`` the component responsibilities at noise level ``sigma``. A full
    covariance is handled in its eigenbasis, ``C_k = U_k diag(s_k^2) U_k^T``, where
    every formula is the diagonal one (``s_k`` are then the principal stds).
    :meth:`denoiser` has the k-diffusion signature ``D(x, sigma_batch)`` and
    accepts tensors of any shape ``[n, ...]`` whose trailing dimensions hold ``d``
    values, so the mixture is a drop-in model for every kdpp sampler.

    Args:
        means: ``[K, d]`` component means.
        stds: ``[K]`` (isotropic) or ``[K, d]`` (diagonal) standard deviations, > 0;
            ``None`` when ``covs`` is given.
        weights: ``[K]`` mixture weights (normalised here); uniform by default.
        covs: ``[K, d, d]`` full covariance matrices (symmetric positive definite)
            instead of ``stds``.
        dtype: the parameters' dtype (float64 recommended for tests).
        device: where the parameters live.
    """

    def __init__(self, means: Tensor | Sequence, stds: Tensor | Sequence | float | None = None,
                 weights: Tensor | Sequence | None = None, *, covs: Tensor | Sequence | None = None,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu"):
        self.means = torch.as_tensor(means, dtype=dtype, device=device)
        if self.means.ndim != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        K, d = self.means.shape
        self.rotations = None  # U_k [K, d, d] for full covariances, None when axis-aligned
        if (stds is None) == (covs is None):
            raise ValueError("give exactly one of stds and covs")
        if covs is not None:
            covs = torch.as_tensor(covs, dtype=dtype, device=device)
            if covs.shape != (K, d, d) or not torch.allclose(covs, covs.transpose(1, 2)):
                raise ValueError(f"covs must be [K, d, d] = [{K}, {d}, {d}] symmetric matrices, got shape {tuple(covs.shape)}")
            eigvals, self.rotations = torch.linalg.eigh(covs)
            if not bool((eigvals > 0).all()):
                raise ValueError("covs must be positive definite")
            stds = eigvals.sqrt()
        stds = torch.as_tensor(stds, dtype=dtype, device=device)
        if stds.ndim == 0:
            stds = stds.expand(K)
        if stds.shape not in ((K,), (K, d)):
            raise ValueError(f"stds must be [K] or [K, d] = [{K}] or [{K}, {d}], got shape {tuple(stds.shape)}")
        if not bool((stds > 0).all()):
            raise ValueError("stds must be positive")
        self.stds = stds.reshape(K, 1).expand(K, d).clone() if stds.ndim == 1 else stds.clone()
        w = torch.full((K,), 1.0 / K, dtype=dtype, device=device) if weights is None else torch.as_tensor(weights, dtype=dtype, device=device)
        if w.shape != (K,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be [K] = [{K}] positive numbers")
        self.weights = w / w.sum()
        self.K, self.d = K, d

    # ---------------------------------------------------------------- basics
    def _like(self, means: Tensor, stds: Tensor, weights: Tensor, **kw) -> "GaussianMixture":
        """A mixture with these parameters and this one's rotations."""
        if self.rotations is None:
            return GaussianMixture(means, stds, weights, **kw)
        covs = self.rotations @ torch.diag_embed(stds**2) @ self.rotations.transpose(1, 2)
        return GaussianMixture(means, None, weights, covs=covs, **kw)

    @property
    def covariances(self) -> Tensor:
        """The component covariances ``[K, d, d]``."""
        cov = torch.diag_embed(self.stds**2)
        return cov if self.rotations is None else self.rotations @ cov @ self.rotations.transpose(1, 2)

    def to(self, dtype: torch.dtype | None = None, device=None) -> "GaussianMixture":
        """A copy with parameters in another dtype and/or on another device."""
        kw = dict(dtype=dtype or self.means.dtype, device=device or self.means.device)
        return self._like(self.means, self.stds, self.weights, **kw)

    @property
    def mean(self) -> Tensor:
        """The mixture mean ``sum_k w_k mu_k``."""
        return self.weights @ self.means

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """``n`` exact samples ``[n, d]`` (and their component labels)."""
        labels = torch.multinomial(self.weights.cpu().float(), n, replacement=True, generator=generator).to(self.means.device)
        eps = torch.randn(n, self.d, generator=generator, dtype=self.means.dtype).to(self.means.device)
        x = self.means[labels] + self._rotate(self.stds[labels] * eps, labels)
        return (x, labels) if return_labels else x

    def _rotate(self, v: Tensor, component: Tensor | None = None) -> Tensor:
        """Eigenbasis coordinates to data coordinates: ``U_k v`` (identity when axis-aligned).

        ``v`` is ``[n, K, d]`` (every component) or ``[n, d]`` with ``component`` ``[n]``.
        """
        if self.rotations is None:
            return v
        if component is not None:
            return torch.einsum("nde,ne->nd", self.rotations[component], v)
        return torch.einsum("kde,nke->nkd", self.rotations, v)

    def _flat(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.d:
            raise ValueError(f"x has {flat.shape[1]} values per sample, the mixture has d = {self.d}")
        return flat.to(self.means.dtype)

    def _component_log_probs(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``log w_k + log N(x; mu_k, C_k + sigma^2 I)`` as ``[n, K]``, with the eigenbasis
        variances ``s_k^2 + sigma^2`` and offsets ``U_k^T (x - mu_k)``, both ``[n, K, d]``."""
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        s2 = (s.reshape(1, 1) if s.numel() == 1 else _sigma_column(s, x)) ** 2  # one sigma: var is [1, K, d]
        var = self.stds.unsqueeze(0) ** 2 + s2.unsqueeze(-1)
        diff = x.unsqueeze(1) - self.means.unsqueeze(0)
        if self.rotations is not None:
            diff = torch.einsum("nkd,kde->nke", diff, self.rotations)
        logp = -0.5 * ((diff**2 / var).sum(-1) + (var.log().sum(-1) + self.d * math.log(2 * math.pi)))
        return logp + self.weights.log(), var, diff

    def log_prob(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """``log p_sigma(x)`` of the noised marginal, shape ``[n]``."""
        xf = self._flat(x)
        return torch.logsumexp(self._component_log_probs(xf, sigma)[0], dim=1)

    def responsibilities(self, x: Tensor, sigma: float | Tensor = 0.0) -> Tensor:
        """``p(component k | x)`` at noise level ``sigma``, shape ``[n, K]``."""
        xf = self._flat(x)
        return torch.softmax(self._component_log_probs(xf, sigma)[0], dim=1)

    def denoiser(self, x: Tensor, sigma: float | Tensor, **extra) -> Tensor:
        """The exact VE denoiser ``E[x0 | x_sigma = x]``, same shape and dtype as ``x``."""
        xf = self._flat(x)
        logp, var, diff = self._component_log_probs(xf, sigma)
        r = torch.softmax(logp, dim=1)  # [n, K]
        per_component = self.means.unsqueeze(0) + self._rotate(self.stds.unsqueeze(0) ** 2 / var * diff)
        return (r.unsqueeze(-1) * per_component).sum(1).reshape(x.shape).to(x.dtype)

    __call__ = denoiser

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """``grad_x log p_sigma(x) = (D(x, sigma) - x) / sigma^2`` (Tweedie), for sigma > 0."""
        s = _sigma_column(sigma, x.reshape(x.shape[0], -1))
        return (self.denoiser(x, sigma) - x) / per_sample(s, x) ** 2

    # ---------------------------------------------------------------- flow map
    def flow_map(self, x: Tensor, sigma_from: float, sigma_to: float, steps_per_unit: int = 32) -> Tensor:
        r"""Transport ``x`` along the probability-flow ODE from ``sigma_from`` to ``sigma_to``.

        The ODE ``dx/d sigma = (x - D(x, sigma)) / sigma`` is integrated in
        ``u = log sigma`` (``dx/du = x - D``) by classical RK4 with
        ``steps_per_unit`` steps per unit of ``u``. ``sigma_to = 0`` integrates to
        ``sigma_end = 1e-4 * min(stds)`` and returns ``D(x, sigma_end)``, whose
        error is ``O(sigma_end^2 / s^2)``. With the default, the error against
        the closed form for one Gaussian is below 2e-7 for |x| up to 60 (tested, float64).
        """
        if not (sigma_from > 0 and sigma_to >= 0):
            raise ValueError(f"need sigma_from > 0 and sigma_to >= 0, got {sigma_from}, {sigma_to}")
        if sigma_to == sigma_from:
            return x.clone()
        end = sigma_to if sigma_to > 0 else 1e-4 * float(self.stds.min())
        u0, u1 = math.log(sigma_from), math.log(end)
        n = max(1, math.ceil(abs(u1 - u0) * steps_per_unit))
        h = (u1 - u0) / n
        xf = self._flat(x)

        def f(y: Tensor, u: float) -> Tensor:
            return y - self.denoiser(y, math.exp(u))

        u = u0
        for _ in range(n):
            k1 = f(xf, u)
            k2 = f(xf + 0.5 * h * k1, u + 0.5 * h)
            k3 = f(xf + 0.5 * h * k2, u + 0.5 * h)
            k4 = f(xf + h * k3, u + h)
            xf = xf + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
            u += h
        if sigma_to == 0:
            xf = self.denoiser(xf, end)
        return xf.reshape(x.shape).to(x.dtype)

    # ---------------------------------------------------------------- variants
    def shifted(self, mean_shift: float | Sequence[float] | Tensor = 0.0, std_scale: float = 1.0,
                weights: Sequence[float] | Tensor | None = None) -> "GaussianMixture":
        """A perturbed copy: means moved by ``mean_shift`` (scalar, [d] or [K, d]), stds scaled, new weights."""
        shift = torch.as_tensor(mean_shift, dtype=self.means.dtype, device=self.means.device)
        return self._like(self.means + shift, self.stds * std_scale, self.weights if weights is None else weights,
                          dtype=self.means.dtype, device=self.means.device)

    def __repr__(self) -> str:
        return f"GaussianMixture(K={self.K}, d={self.d}, dtype={self.means.dtype})"
