r"""The teacher refinement operator of Distillation++ (paper eqs. 7-9).

One DDS-style gradient step on the teacher's SDS loss moves the student's
denoised estimate ``D`` toward the teacher:

    R(D; i) = D + sum_j lam_j(i) * ( T_j(D + tau_i * xi, tau_i) - D )

Every solver in :mod:`kdpp.solvers` calls :meth:`TeacherRefinement.refine` at
the one point MATH.md names (the leading denoised estimate of a step); this
module is the only place the teacher is called.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import (OutputChecker, check_arity, check_callable, check_finite_number, check_kwargs, check_seed,
                      guided_step_indices, warn_caller)
from ._shape import per_sample, sigma_batch, sigma_dtype
from .noise import NoiseSampler, derived_seed, seeded_noise_sampler

Denoiser = Callable[..., Tensor]
#: a teacher guidance scale: constant, one value per guided step, or ``f(i, sigma_i)``
Lam = Union[float, Sequence[float], Callable[[int, float], float]]
#: a renoising level: ``"next"``, ``"current"``, ``"random"``, a constant, or ``f(i, sigma_in, sigma_out)``
RenoiseSigma = Union[str, float, Callable[[int, float, float], float], None]

RENOISE_MODES = ("random", "deterministic", "guidance")
RENOISE_LEVELS = ("next", "current", "random")


class Refined(NamedTuple):
    """What one refinement produced: the estimate the solver uses and what it cost."""

    denoised: Tensor  #: R(D), or D itself when the step is not guided
    teacher_denoised: list[Tensor]  #: one output per teacher called (empty: no call)
    #: tau_i, or None when no teacher was called; a ``[B]`` tensor (the teacher's sigma) when
    #: each batch item has its own level (``renoise_sigma="random"`` with one ``renoise_seed`` per item)
    renoise_sigma: float | Tensor | None


def _lam_values(lam: Lam, name: str, sigmas: list[float], guided: list[int], per_step: str) -> list[float]:
    """lam_i for every guided step i (in the order of ``guided``), validated once up front."""
    if callable(lam):
        check_arity(lam, name, 2, "f(i, sigma_i) -> float")
        return [check_finite_number(lam(i, sigmas[i]), f"{name}({i}, {sigmas[i]:.6g})") for i in guided]
    if isinstance(lam, numbers.Real) or (isinstance(lam, (Tensor, np.ndarray)) and lam.ndim == 0):
        return [check_finite_number(lam, name)] * len(guided)
    if isinstance(lam, (str, bytes, Mapping)) or not isinstance(lam, (Sequence, Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a float, a sequence of floats or a callable (i, sigma) -> float, got {lam!r}")
    values = [check_finite_number(v, f"{name}[{j}]") for j, v in enumerate(lam)]
    if len(values) != len(guided):
        raise ValueError(f"{name} has {len(values)} entries; a per-step lam needs one per guided step, {per_step}")
    return values


class TeacherRefinement:
    r"""``R(D; i) = D + sum_j lam_j(i) * (T_j(D + tau_i * xi, tau_i) - D)`` on the guided steps ``i``.

    The guided steps are the first ``k`` steps, or the steps listed in ``guided_steps``; on
    every other step ``R(D; i) = D`` and no teacher is called.

    Args:
        teacher: a VE denoiser ``T(x, sigma, **teacher_extra_args) -> x0``, or a
            sequence of them (then ``lam`` is a matching sequence of weights,
            each of any form below). May be ``None`` when no step is guided.
        lam: the teacher guidance scale ``lam_i``: a float, one float per guided
            step (in the order of ``guided_steps`` as given; with ``k``, increasing
            step order) or a callable ``(i, sigma_i) -> float``
            evaluated at the guided steps. ``lam_i = 0`` skips the teacher on step ``i``.
        k: guide the first ``k`` steps; ``None`` means 1 unless ``guided_steps`` is given.
        sigmas: the validated schedule (floats); ``len(sigmas) - 1`` steps.
        x: the initial sample (its device, dtype and batch size are used); ``None`` validates
            the options only, and :meth:`start` binds a sample later.
        guided_steps: the step indices to guide instead of the first ``k`` (``0 .. N - 1``
            with ``N = len(sigmas) - 1``; negative ones count from the end, ``-1`` is the
            last step); an empty sequence guides nothing. Not together with ``k``.
        renoise: the renoising noise ``xi``: ``"random"`` (fresh Gaussian, the
            paper's Algorithm 1), ``"deterministic"`` (the student's own noise
            estimate ``(x_in - D_dir) / sigma_in``, so the teacher sees the point
            the plain solver steps to) or ``"guidance"`` (paper eq. 10:
            deterministic noise at the current level, so the teacher sees the
            student's own input ``x_in`` and ``R = D + lam * (T(x_in) - S(x_in))``).
        renoise_sigma: the renoising level ``tau_i``: ``"next"`` (default: the
            noise level of the state the step produces, ``sigma_{i+1}``),
            ``"current"`` (the student's input level), ``"random"`` (log-uniform
            over the schedule's positive range; with one ``renoise_seed`` per batch
            item, one level per item drawn from that item's seed), a constant, or a callable
            ``(i, sigma_in, sigma_out) -> float``. ``tau_i = 0`` makes the
            refinement the identity and spends no teacher call.
        teacher_extra_args: keyword arguments for the teacher (a dict, or one
            dict per teacher).
        renoise_seed: seed of the renoise noise (and of random levels): an int,
            or one int per batch item (an item's noise and level then depend on its
            own seed only, not on the batch it is in). ``None`` derives one from the
            default RNG state of ``x.device`` without advancing it. Use a seed
            different from the solver noise's: :func:`kdpp.noise.seeded_noise_sampler`
            with the same seed draws the very same noise (the two streams are then
            identical); :func:`kdpp.noise.stream_seed` gives unrelated seeds per stream.
        renoise_noise_sampler: a k-diffusion-style noise sampler
            ``(sigma_in, tau) -> Tensor`` that replaces the seeded one (not together
            with ``renoise_seed``, unless ``renoise_sigma="random"``, whose levels it seeds;
            with per-item levels ``tau`` is the largest).
        check: the :class:`~kdpp._checks.OutputChecker` of the run the refinement belongs
            to; by default its own (then call :meth:`raise_if_nonfinite` after sampling).

    The teacher is called with ``sigma`` as a ``[batch]`` tensor of dtype
    ``torch.promote_types(x.dtype, torch.float32)`` (never in half precision).
    """

    def __init__(
        self,
        teacher: Denoiser | Sequence[Denoiser] | None,
        lam: Lam | Sequence[Lam],
        k: int | None,
        sigmas: list[float],
        x: Tensor | None,
        *,
        guided_steps: Sequence[int] | None = None,
        renoise: str = "random",
        renoise_sigma: RenoiseSigma = None,
        teacher_extra_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
        renoise_seed: int | Sequence[int] | None = None,
        renoise_noise_sampler: NoiseSampler | None = None,
        check: OutputChecker | None = None,
    ):
        if renoise not in RENOISE_MODES:
            raise ValueError(f"renoise must be one of {RENOISE_MODES}, got {renoise!r}")
        if renoise == "guidance":
            if renoise_sigma not in (None, "current"):
                raise ValueError(f"renoise='guidance' evaluates the teacher at the current level; got renoise_sigma={renoise_sigma!r}")
            renoise_sigma = "current"
        elif renoise_sigma is None:
            renoise_sigma = "next"
        if isinstance(renoise_sigma, str):
            if renoise_sigma not in RENOISE_LEVELS:
                raise ValueError(f"renoise_sigma must be one of {RENOISE_LEVELS}, a float or a callable, got {renoise_sigma!r}")
        elif not callable(renoise_sigma):
            renoise_sigma = check_finite_number(renoise_sigma, "renoise_sigma", minimum=0)
        else:
            check_arity(renoise_sigma, "renoise_sigma", 3, "f(i, sigma_in, sigma_out) -> float")
        self.renoise, self.renoise_sigma = renoise, renoise_sigma
        self.user_noise_sampler = check_callable(renoise_noise_sampler, "renoise_noise_sampler")
        if renoise_seed is not None:
            renoise_seed = check_seed(renoise_seed, "renoise_seed", None)
            if renoise_noise_sampler is not None and renoise_sigma != "random":
                raise ValueError("renoise_seed and renoise_noise_sampler were both given: the sampler replaces the "
                                 "seeded renoise noise, so the seed would be ignored; give one of them")
        self.renoise_seed = renoise_seed

        several = isinstance(teacher, (list, tuple))
        teachers = list(teacher) if several else [teacher]
        if several:
            if not isinstance(lam, (list, tuple)) or len(lam) != len(teachers):
                raise ValueError(f"with {len(teachers)} teachers, lam must be a list of {len(teachers)} weights, got {lam!r}")
            lams = list(lam)
        else:
            lams = [lam]
        guided = guided_step_indices(k, guided_steps, len(sigmas) - 1)
        per_step = (f"len(guided_steps) = {len(guided)}" if guided_steps is not None
                    else f"min(k, number of steps) = {len(guided)}")
        names = [f"lam[{j}]" for j in range(len(lams))] if several else ["lam"]
        per_teacher = [_lam_values(l, n, sigmas, guided, per_step) for l, n in zip(lams, names)]
        # self.lams[i][j]: weight of teacher j on step i (guided steps only)
        self.lams = {i: list(step) for i, step in zip(guided, zip(*per_teacher))}
        active = any(v != 0 for step in self.lams.values() for v in step)
        if active:
            for j, t in enumerate(teachers):
                check_callable(t, f"teacher{f'[{j}]' if several else ''}", optional=False)
        self.teachers = teachers
        unreachable = [i for i, step in self.lams.items()
                       if any(step) and (renoise_sigma == 0 or (renoise_sigma == "next" and sigmas[i + 1] == 0))]
        if unreachable:
            never = " (the teacher is never called)" if len(unreachable) == sum(any(v) for v in self.lams.values()) else ""
            warn_caller(
                f"guided step(s) {unreachable} call no teacher{never}: their renoise level is 0 (renoise_sigma="
                f"{renoise_sigma!r}{' on the step to sigma 0' if renoise_sigma == 'next' else ''}), where the "
                "refinement is the identity; renoise='guidance' or renoise_sigma='current' guides them")

        if teacher_extra_args is None or isinstance(teacher_extra_args, Mapping):
            targs = [check_kwargs(teacher_extra_args, "teacher_extra_args")] * len(teachers)
        else:
            targs = list(teacher_extra_args) if isinstance(teacher_extra_args, (list, tuple)) else None
            if targs is None or len(targs) != len(teachers) or not all(isinstance(a, Mapping) for a in targs):
                raise ValueError(f"teacher_extra_args must be a dict or one dict per teacher ({len(teachers)}), "
                                 f"got {teacher_extra_args!r}")
        self.teacher_extra_args = targs

        self.active = active
        positive = [s for s in sigmas if s > 0]
        self.log_range = (math.log(min(positive)), math.log(max(positive))) if positive else (0.0, 0.0)
        if x is not None:
            self.start(x, check)

    def start(self, x: Tensor, check: OutputChecker | None = None) -> None:
        """Bind the sample ``x`` of a new run: fresh renoise streams, and ``check`` (default: a new checker).

        With ``renoise_seed=None`` the seed is derived from the default RNG state of ``x.device`` now.
        """
        seed = self.renoise_seed
        if seed is not None:
            seed = check_seed(seed, "renoise_seed", x.shape[0])
        self.check = OutputChecker(x) if check is None else check
        self.batch_like = x.new_empty([x.shape[0]])  # the teacher's sigmas follow x's batch, dtype, device
        self.noise_sampler = (None if self.user_noise_sampler is None
                              else self.check.checked_sampler(self.user_noise_sampler, "renoise_noise_sampler"))
        self.level_generators: list[torch.Generator] = []
        if self.active and (self.renoise == "random" or self.renoise_sigma == "random"):
            seed = derived_seed(x.device) if seed is None else seed
            if self.renoise == "random" and self.noise_sampler is None:
                self.noise_sampler = seeded_noise_sampler(x, seed)
            # one level per run from one seed; one per item (from that item's seed) with per-item seeds
            self.level_generators = [torch.Generator().manual_seed(s) for s in ([seed] if isinstance(seed, int) else seed)]

    def _tau(self, i: int, sigma_in: float, sigma_out: float) -> float | list[float]:
        rs = self.renoise_sigma
        if rs == "next":
            return sigma_out
        if rs == "current":
            return sigma_in
        if rs == "random":
            lo, hi = self.log_range
            levels = [math.exp(lo + torch.rand((), generator=g, dtype=torch.float64).item() * (hi - lo))
                      for g in self.level_generators]
            return levels[0] if len(levels) == 1 else levels
        if callable(rs):
            return check_finite_number(rs(i, sigma_in, sigma_out), f"renoise_sigma({i}, ...)", minimum=0)
        return rs

    def refine(self, i: int, denoised: Tensor, direction: Tensor, x_in: Tensor, sigma_in: float, sigma_out: float) -> Refined:
        """Refine the student's estimate ``denoised = S(x_in, sigma_in)`` on step ``i``.

        ``direction`` is the estimate that defines the student's noise
        ``(x_in - direction) / sigma_in`` (``denoised`` itself, or the
        unconditional estimate in CFG++); ``sigma_out`` is the noise level of the
        state the step produces.
        """
        lams = self.lams.get(i)
        if not lams or not any(lams):
            return Refined(denoised, [], None)
        tau = self._tau(i, sigma_in, sigma_out)
        if isinstance(tau, list):  # one level per batch item: point_b = D_b + tau_b * xi_b
            teacher_sigma = torch.tensor(tau, dtype=sigma_dtype(self.batch_like.dtype)).to(self.batch_like.device)
            scale = per_sample(torch.tensor(tau, dtype=torch.float64), denoised).to(denoised.device)
            reported, label = teacher_sigma, f"{min(tau):.6g}..{max(tau):.6g}"
        elif tau == 0:
            return Refined(denoised, [], None)
        else:
            teacher_sigma, scale, reported, label = sigma_batch(tau, self.batch_like), tau, tau, tau
        if self.renoise == "random":
            point = denoised + scale * self.noise_sampler(sigma_in, max(tau) if isinstance(tau, list) else tau)
        elif tau == sigma_in and denoised is direction:
            point = x_in  # eq. 10: teacher and student see the same input
        else:
            point = denoised + (scale / sigma_in) * (x_in - direction)
        refined, outputs = denoised, []
        for j, (lam, teacher, targs) in enumerate(zip(lams, self.teachers, self.teacher_extra_args)):
            if lam == 0:
                continue
            who = f"teacher[{j}]" if len(self.teachers) > 1 else "teacher"
            t = self.check(teacher(point, teacher_sigma, **targs), who, i, label)
            outputs.append(t)
            refined = refined + lam * (t - denoised)
        return Refined(refined, outputs, reported)

    def raise_if_nonfinite(self) -> None:
        """Raise ``FloatingPointError`` if any teacher output so far contained NaN or inf."""
        self.check.raise_if_nonfinite()
