"""The any-sampler form: a denoiser that returns the teacher-refined estimate.

Wrapping the student in :class:`DistillationDenoiser` turns ANY k-diffusion sampler
(Heun, LMS, DPM++ SDE, 3M SDE, ...) into a Distillation++ sampler. It differs from the
paper's form, which kdpp's own samplers implement: there only the *leading* denoised
estimate of a step is refined and the direction ``(x_i - D) / s_i`` and every higher-order
correction stay the student's; here the sampler sees ``R(D)`` everywhere. For one Euler
step the two differ by

    paper:   x' = D + (s'/s)(x - D) + (R - D)
    wrapper: x' = D + (s'/s)(x - D) + (1 - s'/s)(R - D)

i.e. the wrapper applies the teacher's correction scaled by ``1 - s'/s`` (and feeds it
into multistep histories and stage derivatives as well). See docs/integrations.md for a
comparison on the toy testbed.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ._checks import check_callable, check_denoiser_call, check_sigmas
from ._shape import sigma_batch
from .noise import NoiseSampler
from .refine import Denoiser, Lam, RenoiseSigma, TeacherRefinement
from .schedules import match_tolerance, step_index


class DistillationDenoiser:
    r"""``D'(x, sigma) = R(S(x, sigma))`` for the evaluations that fall in the guided steps of ``sigmas``.

    Every evaluation at a noise level ``sigma`` with ``sigmas[i] >= sigma > sigmas[i+1]``
    belongs to step ``i`` (a Heun corrector evaluated at ``sigmas[i+1]`` belongs to step
    ``i + 1``: :func:`kdpp.schedules.step_index`); the guided steps are the first ``k`` or those
    in ``guided_steps``, indices into ``sigmas``. ``renoise_sigma="auto"`` (default) renoises to
    ``sigmas[i+1]`` (to ``sigma`` on the step to 0), ``"current"`` to ``sigma``. Give the sampler's
    whole schedule as ``sigmas``: a k-diffusion sampler run on a slice of it (a stage of a split
    run) is then guided, and draws renoise noise, by the step of the whole schedule, so the
    stages equal the unsplit run. The options are those of :class:`kdpp.TeacherRefinement`; the sampler's
    ``extra_args`` go to the student, ``teacher_extra_args`` to the teacher.
    The options are validated here, except a per-item ``seed``'s length (checked
    against the batch at the first call).

    Each sampling run starts fresh: a call at the schedule's first level ``sigmas[0]`` (or
    above it, as a churned first step) after calls below it, or with a sample of another
    shape, starts a new run, whose renoise noise is drawn anew from ``seed`` (or,
    without one, from a seed derived from the global RNG state at that call), so reusing
    one wrapper gives the same results as a fresh one. :meth:`reset` starts a new run
    explicitly (for a run that does not begin at ``sigmas[0]``).
    Call :meth:`raise_if_nonfinite` after sampling to check every model output. Finding the
    step reads ``sigma`` on the host once per call (its first entry: k-diffusion's samplers
    call with one level for the whole batch, and sync there anyway).

    Sigma precision: k-diffusion's samplers hand the model ``sigma`` in ``x``'s dtype, so in
    fp16 / bf16 it arrives rounded. A ``sigma`` within that rounding of a schedule entry is
    taken to be the entry, and the student and teacher get ``sigma`` as a tensor of dtype
    ``torch.promote_types(x.dtype, torch.float32)`` (float32 or better), never the rounded one.
    """

    def __init__(self, student: Denoiser, teacher: Denoiser | Sequence[Denoiser] | None,
                 sigmas: Tensor | Sequence[float], lam: Lam | Sequence[Lam], k: int | None = None, *,
                 guided_steps: Sequence[int] | None = None, renoise: str = "random",
                 renoise_sigma: RenoiseSigma = None,
                 teacher_extra_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                 seed: int | Sequence[int] | None = None, renoise_noise_sampler: NoiseSampler | None = None):
        self.student, self.sigmas = check_callable(student, "student", optional=False), check_sigmas(sigmas)
        self.refinement = TeacherRefinement(teacher, lam, k, self.sigmas, None, guided_steps=guided_steps,
                                            renoise=renoise, renoise_sigma=renoise_sigma,
                                            teacher_extra_args=teacher_extra_args, seed=seed,
                                            renoise_noise_sampler=renoise_noise_sampler)
        self._shape: torch.Size | None = None  # the shape of the current run's sample (None: no run yet)
        self._last_level = self.sigmas[0]
        self._restart = True

    def reset(self) -> None:
        """Start a new sampling run at the next call (fresh renoise streams and output checks)."""
        self._restart = True

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra) -> Tensor:
        sigma = torch.as_tensor(sigma)
        i, s = step_index(float(sigma.reshape(-1)[0]), self.sigmas, match_tolerance(sigma.dtype))
        if self._restart or self._shape != x.shape or s >= self.sigmas[0] > self._last_level:  # a new run
            check_denoiser_call(self.student, "student", extra, "extra_args")
            self.refinement.start(x)
            self._shape, self._restart = x.shape, False
        self._last_level = s
        check = self.refinement.check
        denoised = check(self.student(x, sigma_batch(s, x), **extra), "student", i, s)
        return self.refinement.refine(i, denoised, denoised, x, s, self.sigmas[i + 1]).denoised

    def raise_if_nonfinite(self) -> None:
        """Raise if any student or teacher output of the current (latest) run contained NaN or inf."""
        if self._shape is not None:
            self.refinement.raise_if_nonfinite()
