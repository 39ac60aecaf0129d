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

import bisect
from typing import Any, Mapping, Sequence

from torch import Tensor

from ._checks import OutputChecker, check_sigmas
from .noise import NoiseSampler
from .refine import Denoiser, Lam, RenoiseSigma, TeacherRefinement


class DistillationDenoiser:
    r"""``D'(x, sigma) = R(S(x, sigma))`` for the evaluations that fall in the first ``k`` steps of ``sigmas``.

    Every evaluation at a noise level ``sigma`` with ``sigmas[i] >= sigma > sigmas[i+1]``
    belongs to step ``i`` (a Heun corrector evaluated at ``sigmas[i+1]`` belongs to step
    ``i + 1``); ``renoise_sigma="next"`` renoises to ``sigmas[i+1]``, ``"current"`` to
    ``sigma``. The options are those of :class:`kdpp.TeacherRefinement`; the sampler's
    ``extra_args`` go to the student, ``teacher_extra_args`` to the teacher.
    Call :meth:`raise_if_nonfinite` after sampling to check every model output. Finding the
    step reads ``sigma`` on the host once per call (k-diffusion's samplers sync there anyway).
    """

    def __init__(self, student: Denoiser, teacher: Denoiser | Sequence[Denoiser], sigmas: Tensor | Sequence[float],
                 lam: Lam | Sequence[Lam], k: int = 1, *, renoise: str = "random", renoise_sigma: RenoiseSigma = None,
                 teacher_extra_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
                 renoise_seed: int | Sequence[int] | None = None, renoise_noise_sampler: NoiseSampler | None = None):
        self.student, self.sigmas = student, check_sigmas(sigmas)
        self.options = dict(teacher=teacher, lam=lam, k=k, renoise=renoise, renoise_sigma=renoise_sigma,
                            teacher_extra_args=teacher_extra_args, renoise_seed=renoise_seed,
                            renoise_noise_sampler=renoise_noise_sampler)
        self.refinement: TeacherRefinement | None = None
        self.check: OutputChecker | None = None
        self._ascending = self.sigmas[::-1]

    def _step_of(self, sigma: float) -> int:
        """The step ``i`` with ``sigmas[i] >= sigma > sigmas[i+1]`` (clamped to the schedule)."""
        n = len(self.sigmas)
        below = bisect.bisect_left(self._ascending, sigma)  # entries < sigma
        return min(max(n - 1 - below, 0), n - 2)

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        if self.refinement is None or self.check.shape != x.shape:
            self.check = OutputChecker(x)
            opts = dict(self.options)
            self.refinement = TeacherRefinement(opts.pop("teacher"), opts.pop("lam"), opts.pop("k"), self.sigmas, x,
                                                check=self.check, **opts)
        s = float(sigma.reshape(-1)[0])
        i = self._step_of(s)
        denoised = self.check(self.student(x, sigma, **extra), "student", i, s)
        return self.refinement.refine(i, denoised, denoised, x, s, self.sigmas[i + 1]).denoised

    def raise_if_nonfinite(self) -> None:
        """Raise if any student or teacher output so far contained NaN or inf."""
        if self.check is not None:
            self.check.raise_if_nonfinite()
