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

from .._checks import check_finite_number
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

    A model with a floating ``dtype`` attribute (diffusers models) gets ``x_vp`` and
    ``timestep_cond`` in that dtype (its other keyword arguments are the caller's to cast);
    the outputs are in ``x``'s dtype.
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
        self._log_sigmas_on: dict[torch.device, Tensor] = {self.log_sigmas.device: self.log_sigmas}
        self.lcm_boundary = None if lcm_boundary is None else {"timestep_scaling": 10.0, "sigma_data": 0.5, **lcm_boundary}
        self.timestep_cond = timestep_cond
        dtype = getattr(model, "dtype", None)
        self.model_dtype = dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None
        device = getattr(model, "device", None)
        if isinstance(device, torch.device):  # copy the tables there now, not inside the sampling loop
            self.log_sigmas_on(device)
            if timestep_cond is not None:
                self.timestep_cond = timestep_cond.to(device)

    def log_sigmas_on(self, device: torch.device | str) -> Tensor:
        """The float32 ``log sigma_t`` table on ``device``, copied there once and cached.

        A model with a ``device`` attribute (diffusers models) gets its table at construction.
        """
        device = torch.device(device)
        table = self._log_sigmas_on.get(device)
        if table is None:
            table = self._log_sigmas_on[device] = self.log_sigmas.to(device)
        return table

    @property
    def sigma_min(self) -> float:
        return float(self.log_sigmas[0].exp())

    @property
    def sigma_max(self) -> float:
        return float(self.log_sigmas[-1].exp())

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The timestep of ``sigma`` (float32, on ``sigma``'s device): nearest in log sigma, or interpolated.

        Computed in float32 against the table cached on ``sigma``'s device (no host round trip).
        Pass sigma at float32 precision: a bf16 sigma has already lost the timestep (230 of
        the 1000 SD/SDXL training sigmas round to a neighbour's).
        """
        log_sigmas = self.log_sigmas_on(sigma.device)
        log_sigma = sigma.float().log()
        dists = log_sigma[:, None] - log_sigmas[None]
        if self.timestep == "quantized":
            return dists.abs().argmin(dim=1).float()
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The sigma of a (possibly fractional) timestep, interpolated in log sigma."""
        t = t.float()
        low = t.floor().long().clamp(0, len(self.log_sigmas) - 1)
        high = t.ceil().long().clamp(0, len(self.log_sigmas) - 1)
        w = t - low
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def boundary_scalings(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """LCM's ``(c_skip, c_out)`` at timestep ``t`` (float32); ``(0, 1)`` without a boundary condition."""
        if self.lcm_boundary is None:
            return torch.zeros_like(t), torch.ones_like(t)
        st = t.float() * self.lcm_boundary["timestep_scaling"]
        sd = self.lcm_boundary["sigma_data"]
        return sd**2 / (st**2 + sd**2), st / (st**2 + sd**2).sqrt()

    def _prediction(self, x: Tensor, sigma: Tensor, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x0_model, x_vp, t, s)``: the model's clean estimate from its prediction, its input, timestep, sigma."""
        s32 = sigma.float().reshape(-1, *([1] * (x.ndim - 1)))
        s, scale = s32.to(x.dtype), (1 + s32 * s32).rsqrt().to(x.dtype)
        x_vp = x * scale
        t = self.sigma_to_t(sigma)
        x_in = x_vp if self.model_dtype is None else x_vp.to(self.model_dtype)
        if self.timestep_cond is not None:
            kwargs = {**kwargs, "timestep_cond": self.timestep_cond.to(x_in).expand(x.shape[0], -1)}
        out = self.model(x_in, t, **kwargs)
        out = out.sample if hasattr(out, "sample") else out[0] if isinstance(out, (tuple, list)) else out
        if out.is_floating_point():
            out = out.to(x.dtype)
        if self.prediction == "epsilon":
            x0 = x - s * out
        elif self.prediction == "v_prediction":
            x0 = (x_vp - s * out) * scale
        else:
            x0 = out
        return x0, x_vp, t, s

    def denoise(self, x: Tensor, sigma: Tensor, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
        """``(D, c_out, c_skip * x_vp)`` with ``D = c_out * x0_model + c_skip * x_vp`` (x's dtype).

        ``x0_model`` is the model's clean estimate from its prediction; without LCM's boundary
        condition ``c_out = 1`` and ``c_skip * x_vp = 0``. ``sigma`` is read in float32 (the
        timestep and the input scaling); every output is in ``x``'s dtype, whatever the model's.
        """
        x0, x_vp, t, s = self._prediction(x, sigma, **kwargs)
        if self.lcm_boundary is None:
            return x0, torch.ones_like(s), torch.zeros_like(x0)
        c_skip, c_out = (c.reshape(s.shape).to(x.dtype) for c in self.boundary_scalings(t))
        skip = c_skip * x_vp
        return c_out * x0 + skip, c_out, skip

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        if self.lcm_boundary is None:  # D = x0_model: no boundary terms to build
            return self._prediction(x, sigma, **kwargs)[0]
        return self.denoise(x, sigma, **kwargs)[0]


class EpsilonSpaceGuidance:
    r"""Distillation++ mixed in epsilon space, as the authors' LCM/DMD2 sampler does it.

    Their ``random++`` sampler mixes the student's noise prediction with the teacher's at the
    renoised point, ``eps = eps_S + lam_eps (eps_T - eps_S)``, and maps ``eps`` through the
    student's own parametrization (LCM: with its boundary condition). In VE terms, with the
    student's ``D = c_out x0_S + c_skip x_vp`` at ``(x_i, sigma_i)``, ``eps_S = (x_i - x0_S) / sigma_i``
    and ``eps_T = (p - T(p, tau)) / tau`` at the renoised point ``p = D + tau xi``::

        D_eps = D - lam_eps c_out sigma_i (eps_T - eps_S)
              = D + lam_eps c_out (sigma_i / tau) (T(p, tau) - D) + lam_eps c_out sigma_i (eps_S - xi)

    an x0-space refinement of strength ``lam_eps c_out sigma_i / tau`` plus a noise term (zero
    when ``xi = eps_S``); ``docs/sdxl.md`` has the derivation. The core's refinement is
    ``R = D + lam (T'(p, tau) - D)``; with ``lam = 1`` and the teacher ``T' = D_eps`` it is this
    mix. :attr:`student` records each call's parts, :attr:`teacher` reads them, so pass both
    to a kdpp sampler with ``lam = 1`` (on the guided steps)::

        pair = EpsilonSpaceGuidance(VPDenoiser(unet, a, lcm_boundary={}), teacher, lam_eps=0.01)
        kdpp.sample_lcm_distpp(pair.student, pair.teacher, x, sigmas, 1.0, k=1, ...)

    Args:
        student: the student :class:`VPDenoiser`.
        teacher: the teacher VE denoiser ``T(x, sigma, **kwargs) -> x0`` (e.g. CFG of a VPDenoiser).
        lam_eps: the epsilon-space strength (the authors' ``teacher_guidance``, 0.01).
    """

    def __init__(self, student: VPDenoiser, teacher: Callable[..., Tensor], lam_eps: float):
        if not isinstance(student, VPDenoiser):
            raise TypeError(f"student must be a VPDenoiser (its epsilon is needed), got {type(student).__name__}")
        if not callable(teacher):
            raise TypeError(f"teacher must be a callable denoiser, got {teacher!r}")
        self._student, self._teacher = student, teacher
        self.lam_eps = check_finite_number(lam_eps, "lam_eps")
        self._last: tuple[Tensor, Tensor, Tensor, Tensor, Tensor] | None = None

    def student(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        """The student's ``D``; remembers ``(x, sigma, D, c_out, c_skip x_vp)`` for the teacher call."""
        denoised, c_out, skip = self._student.denoise(x, sigma, **kwargs)
        self._last = (x, sigma, denoised, c_out, skip)
        return denoised

    def teacher(self, point: Tensor, tau: Tensor, **kwargs) -> Tensor:
        """``D_eps`` of the student's last call, with the teacher evaluated at ``(point, tau)``."""
        if self._last is None:
            raise RuntimeError("EpsilonSpaceGuidance.teacher was called before its student: pass pair.student "
                               "and pair.teacher to the same sampler")
        x, sigma, denoised, c_out, skip = self._last
        t, s = per_sample(tau, point), per_sample(sigma, x)
        eps_t = (point - self._teacher(point, tau, **kwargs)) / t
        # c_out * sigma * eps_S = c_out * x + c_skip * x_vp - D
        return denoised - self.lam_eps * (c_out * s * eps_t - (c_out * x + skip - denoised))
