"""Euler ancestral with Distillation++."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._checks import check_solver_options
from ..noise import NoiseSampler
from ..refine import Denoiser, Lam, RenoiseSigma
from ._run import SamplerRun, ancestral_step, cfg_pp_variant, documented, step


@torch.no_grad()
@documented
def sample_euler_ancestral_distpp(
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
    eta: float = 1.0,
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
    """Euler ancestral steps; the guided steps refined by the teacher.

    Each step, with ``(s_down, s_up) = ancestral_step(s_i, s_{i+1}, eta)`` and
    ``z = noise_sampler(s_i, s_{i+1})``::

        D = S(x_i, s_i)
        x_{i+1} = R(D) + s_down * (x_i - D) / s_i + s_noise * s_up * z

    (no noise on the step to 0). The teacher is renoised to the noise level of
    the next state, ``s_{i+1}``, not to ``s_up`` (on the step to 0 the default level
    ``"auto"`` renoises at ``s_i``, where ``"next"`` would call no teacher).
    CFG++: ``R(D_w)`` leads and ``D_u`` gives the direction. With ``lam = 0``
    this is k-diffusion's ``sample_euler_ancestral``.

    {args}
        eta: ancestral noise fraction (0: deterministic Euler).
        s_noise: scale of the ancestral noise.
        noise_sampler: ``(sigma, sigma_next) -> Tensor``; default: ``seed``'s solver stream, else ``randn_like(x)``.
    """
    eta, s_noise = check_solver_options(eta=eta, s_noise=s_noise)
    run = SamplerRun(student, teacher, x, sigmas, lam, k, guided_steps=guided_steps, extra_args=extra_args,
                     teacher_extra_args=teacher_extra_args, callback=callback, disable=disable,
                     renoise=renoise, renoise_sigma=renoise_sigma, seed=seed,
                     renoise_noise_sampler=renoise_noise_sampler, full_sigmas=full_sigmas, step_offset=step_offset,
                     cfg_pp=cfg_pp, noise_sampler=noise_sampler)
    sigmas = run.sigmas
    for i in run.steps():
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, direction = run.denoise(x, sigma, i)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        refined = run.refine(i, denoised, direction, x, sigma, sigma_next)
        run.report(i, x, denoised, refined)
        x = step(refined.denoised, direction, x, sigma_down / sigma)
        if sigma_next > 0:
            x = torch.add(x, run.noise(i, x, sigma, sigma_next), alpha=s_noise * sigma_up)
    return run.finish(x)


sample_euler_ancestral_cfg_pp_distpp = cfg_pp_variant(sample_euler_ancestral_distpp)
