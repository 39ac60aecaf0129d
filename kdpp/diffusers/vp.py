"""VP (DDPM-style) models such as diffusers' UNets as VE denoisers.

A VP model sees ``x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` at an integer timestep ``t``
(``a_t = alphas_cumprod[t]``). In the VE convention ``sigma_t = sqrt((1 - a_t) / a_t)`` and
``x = x_vp / sqrt(a_t) = x_vp * sqrt(1 + sigma^2)``. This module needs no diffusers import:
any callable with the UNet contract ``model(x_vp, t, **kwargs)`` returning a tensor, a tuple
or an object with ``.sample`` works.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor

from .._shape import per_sample
from ..schedules import vp_sigmas

PREDICTIONS = ("epsilon", "v_prediction", "sample")


def guidance_scale_embedding(w: Tensor | float, dim: int, batch: int | None = None) -> Tensor:
    """LCM's guidance-scale embedding of ``w`` (``timestep_cond``): sinusoidal features of ``1000 (w - 1)``.

    ``[sin(1000 (w-1) f_j), cos(1000 (w-1) f_j)]`` with ``f_j = exp(-log(10000) j / (dim/2 - 1))``,
    zero-padded when ``dim`` is odd; shape ``[batch, dim]``.
    """
    w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
    if batch is not None:
        w = w.expand(batch)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    angles = (w - 1)[:, None] * 1000.0 * freqs[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class VPDenoiser:
    r"""A VP model as a VE denoiser ``D(x, sigma, **kwargs)``.

    Args:
        model: ``model(x_vp, t, **kwargs)``; every keyword argument is forwarded, in every
            prediction mode.
        alphas_cumprod: the training schedule's ``alphabar_t`` (e.g. ``scheduler.alphas_cumprod``).
        prediction: ``"epsilon"`` (``D = x - sigma * eps``), ``"v_prediction"``
            (``D = (x_vp - sigma * v) / sqrt(1 + sigma^2)``) or ``"sample"`` (``D = model(...)``).
        timestep: ``"quantized"`` (the nearest integer timestep in log sigma, as diffusers'
            discrete schedulers pass it) or ``"continuous"`` (linear interpolation of the
            timestep in log sigma). The mapping is computed in float32.
        lcm_boundary: LCM's boundary condition: ``None`` or a dict with ``timestep_scaling``
            (10) and ``sigma_data`` (0.5); then ``D = c_out * x0_pred + c_skip * x_vp`` with
            ``c_skip = sd^2 / ((s t)^2 + sd^2)``, ``c_out = s t / sqrt((s t)^2 + sd^2)``, exactly as
            diffusers' ``LCMScheduler``.
        timestep_cond: a tensor passed as ``timestep_cond`` on every call (LCM's guidance-scale
            embedding, :func:`guidance_scale_embedding`), repeated to the batch.
    """

    def __init__(self, model: Callable[..., Any], alphas_cumprod: Tensor, prediction: str = "epsilon",
                 timestep: str = "quantized", lcm_boundary: dict | None = None, timestep_cond: Tensor | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if timestep not in ("quantized", "continuous"):
            raise ValueError(f"timestep must be 'quantized' or 'continuous', got {timestep!r}")
        self.model, self.prediction, self.timestep = model, prediction, timestep
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod).double()
        self.log_sigmas = vp_sigmas(self.alphas_cumprod).log().float()
        self.lcm_boundary = None if lcm_boundary is None else {"timestep_scaling": 10.0, "sigma_data": 0.5, **lcm_boundary}
        self.timestep_cond = timestep_cond

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The timestep of ``sigma`` (float32): nearest in log sigma, or interpolated."""
        log_sigma = sigma.float().log().to(self.log_sigmas.device)
        dists = log_sigma[:, None] - self.log_sigmas[None]
        if self.timestep == "quantized":
            return dists.abs().argmin(dim=1).float().to(sigma.device)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=len(self.log_sigmas) - 2)
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).float().to(sigma.device)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The sigma of a (possibly fractional) timestep, interpolated in log sigma."""
        t = t.float()
        low = t.floor().long().clamp(0, len(self.log_sigmas) - 1)
        high = t.ceil().long().clamp(0, len(self.log_sigmas) - 1)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        s = per_sample(sigma, x)
        scale = (1 + s * s).rsqrt()
        x_vp = x * scale
        t = self.sigma_to_t(sigma)
        if self.timestep_cond is not None:
            kwargs = {**kwargs, "timestep_cond": self.timestep_cond.to(x).expand(x.shape[0], -1)}
        out = self.model(x_vp, t, **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
        if self.prediction == "epsilon":
            x0 = x - s * out
        elif self.prediction == "v_prediction":
            x0 = (x_vp - s * out) * scale
        else:
            x0 = out
        if self.lcm_boundary is None:
            return x0
        st = t.reshape(s.shape).to(x.dtype) * self.lcm_boundary["timestep_scaling"]
        sd = self.lcm_boundary["sigma_data"]
        c_skip = sd**2 / (st**2 + sd**2)
        c_out = st / (st**2 + sd**2).sqrt()
        return c_out * x0 + c_skip * x_vp
