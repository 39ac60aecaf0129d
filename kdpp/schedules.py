"""Noise schedules (VE sigmas, decreasing, ending in 0)."""
from __future__ import annotations

import torch
from torch import Tensor


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): ``n`` sigmas evenly spaced in ``sigma^(1/rho)``, then 0 (float64)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def scaled_linear_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """``alphas_cumprod`` of the SD / SDXL "scaled_linear" beta schedule (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """VE sigma of every VP timestep: ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def trailing_timesteps(n: int, num_train_timesteps: int = 1000) -> list[int]:
    """The "trailing" spacing of distilled students: ``T-1, T-1-T/n, ...`` (4 steps: 999, 749, 499, 249)."""
    return [round(num_train_timesteps - j * num_train_timesteps / n) - 1 for j in range(n)]


def timestep_sigmas(timesteps: list[int], alphas_cumprod: Tensor | None = None) -> Tensor:
    """The sigmas of the given VP timesteps, then 0 (default: the SD / SDXL schedule)."""
    sigmas = vp_sigmas(scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    return torch.cat([sigmas[list(timesteps)], torch.zeros(1, dtype=torch.float64)])
