"""Euler (DDIM) with Distillation++."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._checks import check_solver_options
from ..noise import NoiseSampler
from ..refine import Denoiser, Lam, RenoiseSigma
from ._run import SamplerRun, cfg_pp_variant, documented, step


@torch.no_grad()
@documented
def sample_euler_distpp(
    student: Denoiser,
    teacher: Denoiser | Sequence[Denoiser] | None,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    lam: Lam | Sequence[Lam],
    k: int | None = None,
    *,
    guided_steps: Sequence[int] | None = None,
    extra_args: Mapping[str, Any] | None = None,
    teacher_extra_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    callback: Callable[[dict], Any] | None = None,
    disable: bool | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise_sampler: NoiseSampler | None = None,
    renoise: str = "random",
    renoise_sigma: RenoiseSigma = None,
    seed: int | Sequence[int] | None = None,
    renoise_noise_sampler: NoiseSampler | None = None,
    full_sigmas: Tensor | Sequence[float] | None = None,
    step_offset: int | None = None,
    cfg_pp: bool = False,
) -> Tensor:
    """Euler (DDIM) steps; the guided steps refined by the teacher.

    Each step, with ``R`` the teacher refinement (:class:`kdpp.TeacherRefinement`)::

        D = S(x_i, s_i)
        x_{i+1} = R(D) + s_{i+1} * (x_i - D) / s_i

    CFG++ (``cfg_pp=True``): ``x_{i+1} = R(D_w) + s_{i+1} * (x_i - D_u) / s_i``.
    With ``s_churn > 0`` (Karras et al. 2022, Algorithm 2) the step first raises
    the noise to ``s_hat = s_i * (1 + gamma)`` with ``noise_sampler`` noise times
    ``s_noise`` and then steps from ``(x_hat, s_hat)``. With ``lam = 0`` this is
    k-diffusion's ``sample_euler``, except that churn noise is drawn only on churned
    steps (as in ComfyUI), where k-diffusion also draws, and drops, it on the steps
    ``s_tmin`` / ``s_tmax`` exclude.

    {args}
        s_churn: k-diffusion's stochastic churn: ``gamma = min(s_churn / N, sqrt(2) - 1)``.
        s_tmin: churn only steps with ``s_tmin <= s_i``.
        s_tmax: churn only steps with ``s_i <= s_tmax``.
        s_noise: scale of the churn noise.
        noise_sampler: ``(sigma, sigma_next) -> Tensor`` for the churn noise (default: ``seed``'s solver
            stream, else ``randn_like(x)``).
    """
    s_churn, s_tmin, s_tmax, s_noise = check_solver_options(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    run = SamplerRun(student, teacher, x, sigmas, lam, k, guided_steps=guided_steps, extra_args=extra_args,
                     teacher_extra_args=teacher_extra_args, callback=callback, disable=disable,
                     renoise=renoise, renoise_sigma=renoise_sigma, seed=seed,
                     renoise_noise_sampler=renoise_noise_sampler, full_sigmas=full_sigmas, step_offset=step_offset,
                     cfg_pp=cfg_pp, noise_sampler=noise_sampler)
    sigmas = run.sigmas
    for i in run.steps():
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / (len(sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            x = torch.add(x, run.noise(i, x, sigma, sigma_next), alpha=s_noise * (sigma_hat**2 - sigma**2) ** 0.5)
        denoised, direction = run.denoise(x, sigma_hat, i)
        refined = run.refine(i, denoised, direction, x, sigma_hat, sigma_next)
        run.report(i, x, denoised, refined, gamma)
        x = step(refined.denoised, direction, x, sigma_next / sigma_hat)
    return run.finish(x)


sample_euler_cfg_pp_distpp = cfg_pp_variant(sample_euler_distpp)
