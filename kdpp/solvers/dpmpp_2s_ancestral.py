"""DPM-Solver++(2S) ancestral with Distillation++."""
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
def sample_dpmpp_2s_ancestral_distpp(
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
    """DPM-Solver++(2S) ancestral steps; both stages of a guided step refined.

    Each step, with ``(s_down, s_up) = ancestral_step(s_i, s_{i+1}, eta)``,
    the midpoint ``s_mid = sqrt(s_i * s_down)`` (r = 1/2) and
    ``z = noise_sampler(s_i, s_{i+1})``::

        D1 = S(x_i, s_i)
        x_mid = R(D1) + s_mid * (x_i - D1) / s_i          # teacher renoised to s_mid
        D2 = S(x_mid, s_mid)
        x_{i+1} = R(D2) + s_down * (x_i - D2) / s_i + s_noise * s_up * z

    The second refinement renoises to ``s_{i+1}``; when ``s_down = 0`` (the
    step to 0) the step is ``x_{i+1} = R(D1) + s_up * z``, one student call. A
    guided step therefore costs two teacher calls (one on the step to 0 with the
    default ``renoise_sigma="auto"`` or ``"current"``, none with ``"next"``). CFG++: ``R(D_w)`` leads
    and ``D_u`` of the same stage gives the direction. With ``lam = 0`` this is
    k-diffusion's ``sample_dpmpp_2s_ancestral``.

    {args}
        eta: ancestral noise fraction (0: deterministic DPM-Solver++(2S)).
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
        if sigma_down == 0:
            refined = run.refine(i, denoised, direction, x, sigma, sigma_next)
            run.report(i, x, denoised, refined)
            x = refined.denoised
        else:
            sigma_mid = (sigma * sigma_down) ** 0.5
            refined = run.refine(i, denoised, direction, x, sigma, sigma_mid)
            run.report(i, x, denoised, refined)
            x_mid = step(refined.denoised, direction, x, sigma_mid / sigma)
            denoised_2, direction_2 = run.denoise(x_mid, sigma_mid, i)
            refined_2 = run.refine(i, denoised_2, direction_2, x_mid, sigma_mid, sigma_next)
            x = step(refined_2.denoised, direction_2, x, sigma_down / sigma)
        if sigma_next > 0:
            x = torch.add(x, run.noise(i, x, sigma, sigma_next), alpha=s_noise * sigma_up)
    return run.finish(x)


sample_dpmpp_2s_ancestral_cfg_pp_per_stage_distpp = cfg_pp_variant(sample_dpmpp_2s_ancestral_distpp, "cfg_pp_per_stage")
