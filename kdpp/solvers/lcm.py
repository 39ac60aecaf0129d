"""Multistep consistency sampling (LCM, DMD2) with Distillation++."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..noise import NoiseSampler
from ..refine import Denoiser, Lam, RenoiseSigma
from ._run import SamplerRun, documented


@torch.no_grad()
@documented
def sample_lcm_distpp(
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
    noise_sampler: NoiseSampler | None = None,
    renoise: str = "random",
    renoise_sigma: RenoiseSigma = None,
    seed: int | Sequence[int] | None = None,
    renoise_noise_sampler: NoiseSampler | None = None,
    full_sigmas: Tensor | Sequence[float] | None = None,
    step_offset: int | None = None,
) -> Tensor:
    """Multistep consistency ("iterative random") sampling; the guided steps refined.

    For students that predict the ODE endpoint (LCM, DMD2, consistency models),
    with ``z = noise_sampler(s_i, s_{i+1})``::

        D = S(x_i, s_i)
        x_{i+1} = R(D) + s_{i+1} * z          (x_N = R(D) on the step to 0)

    {args}
        noise_sampler: ``(sigma, sigma_next) -> Tensor``; default: ``seed``'s solver stream, else ``randn_like(x)``.
    """
    run = SamplerRun(student, teacher, x, sigmas, lam, k, guided_steps=guided_steps, extra_args=extra_args,
                     teacher_extra_args=teacher_extra_args, callback=callback, disable=disable,
                     renoise=renoise, renoise_sigma=renoise_sigma, seed=seed,
                     renoise_noise_sampler=renoise_noise_sampler, full_sigmas=full_sigmas, step_offset=step_offset,
                     cfg_pp=False, noise_sampler=noise_sampler)
    sigmas = run.sigmas
    for i in run.steps():
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, direction = run.denoise(x, sigma, i)
        refined = run.refine(i, denoised, direction, x, sigma, sigma_next)
        run.report(i, x, denoised, refined)
        x = refined.denoised
        if sigma_next > 0:
            x = torch.add(x, run.noise(i, x, sigma, sigma_next), alpha=sigma_next)
    return run.finish(x)
