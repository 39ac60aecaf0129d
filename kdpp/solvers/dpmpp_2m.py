"""DPM-Solver++(2M) with Distillation++."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..noise import NoiseSampler
from ..refine import Denoiser, Lam, RenoiseSigma
from ._run import SamplerRun, cfg_pp_variant, documented, step


@torch.no_grad()
@documented
def sample_dpmpp_2m_distpp(
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
    renoise: str = "random",
    renoise_sigma: RenoiseSigma = None,
    seed: int | Sequence[int] | None = None,
    renoise_noise_sampler: NoiseSampler | None = None,
    full_sigmas: Tensor | Sequence[float] | None = None,
    step_offset: int | None = None,
    cfg_pp: bool = False,
    history: str = "student",
) -> Tensor:
    """DPM-Solver++(2M) steps; the guided steps refined by the teacher.

    Each step, with ``h = log(s_i / s_{i+1})``, ``r = h_last / h``
    (``h_last = log(s_{i-1} / s_i)``)::

        D = S(x_i, s_i)
        x_{i+1} = R(D) + s_{i+1} * (x_i - D) / s_i
                  + (1 - s_{i+1} / s_i) * (D - D_old) / (2 r)

    The first step and the step to 0 drop the last (second-order) term. The
    history ``D_old`` is the student's *unrefined* estimate of the previous
    step (docs/method.md); ``history="refined"`` keeps ``R(D)`` instead (on the toy
    benchmark it was worse for k = 1, 2 and 4; see docs/solvers/dpmpp_2m.md).
    CFG++: ``R(D_w)`` leads, ``D_u`` gives the direction, and the correction
    extrapolates the guided estimates ``(D_w - D_w_old)``. With
    ``lam = 0`` this is k-diffusion's ``sample_dpmpp_2m``.

    {args}
        history: ``"student"`` (default) or ``"refined"``: which estimate the
            second-order term extrapolates from.
    """
    if history not in ("student", "refined"):
        raise ValueError(f"history must be 'student' or 'refined', got {history!r}")
    run = SamplerRun(student, teacher, x, sigmas, lam, k, guided_steps=guided_steps, extra_args=extra_args,
                     teacher_extra_args=teacher_extra_args, callback=callback, disable=disable,
                     renoise=renoise, renoise_sigma=renoise_sigma, seed=seed,
                     renoise_noise_sampler=renoise_noise_sampler, full_sigmas=full_sigmas, step_offset=step_offset,
                     cfg_pp=cfg_pp)
    sigmas = run.sigmas
    old_denoised = None
    for i in run.steps():
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised, direction = run.denoise(x, sigma, i)
        refined = run.refine(i, denoised, direction, x, sigma, sigma_next)
        run.report(i, x, denoised, refined)
        x_next = step(refined.denoised, direction, x, sigma_next / sigma)
        if old_denoised is not None and sigma_next > 0:
            r = math.log(sigmas[i - 1] / sigma) / math.log(sigma / sigma_next)
            x_next = torch.add(x_next, denoised - old_denoised, alpha=(1 - sigma_next / sigma) / (2 * r))
        x, old_denoised = x_next, denoised if history == "student" else refined.denoised
    return run.finish(x)


sample_dpmpp_2m_cfg_pp_guided_history_distpp = cfg_pp_variant(sample_dpmpp_2m_distpp, "cfg_pp_guided_history")
