r"""The teacher refinement operator of Distillation++ (paper eqs. 7-9).

One DDS-style gradient step on the teacher's SDS loss moves the student's
denoised estimate ``D`` toward the teacher:

    R(D; i) = D + sum_j lam_j(i) * ( T_j(D + tau_i * xi, tau_i) - D )

Every solver in :mod:`kdpp.solvers` calls :meth:`TeacherRefinement.refine` at
the one point the method names (the leading denoised estimate of a step; see
docs/method.md); this module is the only place the teacher is called. It also owns
the run's place in a split schedule (``full_sigmas``, ``step_offset``): which steps
are guided, and the absolute step that keys the renoise noise and random levels.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping, NamedTuple, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ._checks import (OutputChecker, check_arity, check_callable, check_denoiser_call, check_finite_number, check_k,
                      check_kwargs, check_seed, check_sigmas, guided_step_indices, warn_caller, warn_unusual_lam)
from ._shape import per_sample, sigma_batch, sigma_dtype
from .noise import NoiseSampler, StepStreams, derived_seed
from .schedules import stage_offset

Denoiser = Callable[..., Tensor]
#: a teacher guidance scale: constant, one value per guided step, or ``f(i, sigma_i)``
Lam = Union[float, Sequence[float], Callable[[int, float], float]]
#: a renoising level: ``"auto"``, ``"next"``, ``"current"``, ``"random"``, a constant, or ``f(i, sigma_in, sigma_out)``
RenoiseSigma = Union[str, float, Callable[[int, float, float], float], None]

RENOISE_MODES = ("random", "deterministic", "guidance")
RENOISE_LEVELS = ("auto", "next", "current", "random")


class Refined(NamedTuple):
    """What one refinement produced: the estimate the solver uses and what it cost."""

    denoised: Tensor  #: R(D), or D itself when the step is not guided
    teacher_denoised: list[Tensor]  #: one output per teacher called (empty: no call)
    #: tau_i, or None when no teacher was called; a ``[B]`` tensor (the teacher's sigma) when
    #: each batch item has its own level (``renoise_sigma="random"`` with one ``seed`` per item)
    renoise_sigma: float | Tensor | None


def _lam_values(lam: Lam, name: str, sigmas: list[float], guided: list[int], per_step: str) -> list[float]:
    """lam_i for every guided step i (in the order of ``guided``), validated once up front."""
    if callable(lam):
        check_arity(lam, name, 2, "f(i, sigma_i) -> float")
        return [check_finite_number(lam(i, sigmas[i]), f"{name}({i}, {sigmas[i]:.6g})") for i in guided]
    if isinstance(lam, numbers.Real) or (isinstance(lam, (Tensor, np.ndarray)) and lam.ndim == 0):
        value = check_finite_number(lam, name)
        warn_unusual_lam(value, name)
        return [value] * len(guided)
    if isinstance(lam, (str, bytes, Mapping)) or not isinstance(lam, (Sequence, Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a float, a sequence of floats or a callable (i, sigma) -> float, got {lam!r}")
    values = [check_finite_number(v, f"{name}[{j}]") for j, v in enumerate(lam)]
    if len(values) != len(guided):
        raise ValueError(f"{name} has {len(values)} entries; a per-step lam needs one per guided step, {per_step}")
    for j, value in enumerate(values):
        warn_unusual_lam(value, f"{name}[{j}]")
    return values


class TeacherRefinement:
    r"""``R(D; i) = D + sum_j lam_j(i) * (T_j(D + tau_i * xi, tau_i) - D)`` on the guided steps ``i``.

    The guided steps are the first ``k`` steps, or the steps listed in ``guided_steps``, of the
    full run; on every other step ``R(D; i) = D`` and no teacher is called.

    Args:
        teacher: a VE denoiser ``T(x, sigma, **teacher_extra_args) -> x0``, or a
            sequence of them (then ``lam`` is a matching sequence of weights,
            each of any form below). May be ``None`` when no step is guided.
        lam: the teacher guidance scale ``lam_i``: a float, one float per guided
            step (in the order of ``guided_steps`` as given; with ``k``, increasing
            step order) or a callable ``(i, sigma_i) -> float`` of the absolute step
            evaluated at the guided steps. ``lam_i = 0`` skips the teacher on step ``i``.
            Values outside 0 .. 2 warn (lam is an interpolation weight, not a CFG scale).
        k: guide the first ``k`` steps of the full run; ``None`` means 1 unless ``guided_steps`` is given.
        sigmas: the validated schedule of this call (floats); ``len(sigmas) - 1`` steps.
        x: the initial sample (its device, dtype and batch size are used); ``None`` validates
            the options only, and :meth:`start` binds a sample later.
        guided_steps: the absolute step indices to guide instead of the first ``k``
            (``0 .. N - 1`` with ``N`` the full run's step count; negative ones count from
            the end, ``-1`` is the last step); an empty sequence guides nothing. Not together with ``k``.
        renoise: the renoising noise ``xi``: ``"random"`` (fresh Gaussian, the
            paper's Algorithm 1), ``"deterministic"`` (the student's own noise
            estimate ``(x_in - D_dir) / sigma_in``, so the teacher sees the point
            the plain solver steps to) or ``"guidance"`` (paper eq. 10:
            deterministic noise at the current level, so the teacher sees the
            student's own input ``x_in`` and ``R = D + lam * (T(x_in) - S(x_in))``).
        renoise_sigma: the renoising level ``tau_i``; ``None`` (the default) is ``"auto"``, or
            ``"current"`` with ``renoise="guidance"``. ``"auto"``: the noise
            level of the state the step produces, ``sigma_{i+1}``, except on a step to
            ``sigma = 0``, where it is the current level ``sigma_i``; ``"next"``
            (``sigma_{i+1}`` always: a guided step to 0 then calls no teacher),
            ``"current"`` (the student's input level), ``"random"`` (log-uniform over
            the full schedule's positive range, one level per step and per seed), a
            constant, or a callable ``(i, sigma_in, sigma_out) -> float``. ``tau_i = 0``
            makes the refinement the identity and spends no teacher call.
        teacher_extra_args: keyword arguments for the teacher (a dict, or one
            dict per teacher).
        seed: the run's seed (an int, or one int per batch item): the renoise noise of
            absolute step ``j`` is drawn from ``stream_seed(stream_seed(seed, 2), j)`` and
            random levels from stream 3 (:mod:`kdpp.noise`), so split runs draw what unsplit
            ones do and an item's draws depend on its own seed only. ``None`` derives one
            from the default RNG state of ``x.device`` without advancing it.
        renoise_noise_sampler: a k-diffusion-style noise sampler ``(sigma_in, tau) -> Tensor``
            that replaces the seeded renoise noise (with per-item random levels ``tau`` is the largest).
        full_sigmas: the full run's schedule when this call samples a stage of it (a split
            schedule); ``k``, ``guided_steps`` and the random-level range count on it.
            Default: ``sigmas``.
        step_offset: the index of ``sigmas[0]`` in ``full_sigmas`` (default: found there).
        check: the :class:`~kdpp._checks.OutputChecker` of the run the refinement belongs
            to; by default its own (then call :meth:`raise_if_nonfinite` after sampling).
        teacher_args_source: how errors name where ``teacher_extra_args`` came from.

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
        seed: int | Sequence[int] | None = None,
        renoise_noise_sampler: NoiseSampler | None = None,
        full_sigmas: Tensor | Sequence[float] | None = None,
        step_offset: int | None = None,
        check: OutputChecker | None = None,
        teacher_args_source: str = "teacher_extra_args",
    ):
        if renoise not in RENOISE_MODES:
            raise ValueError(f"renoise must be one of {RENOISE_MODES}, got {renoise!r}")
        if renoise == "guidance":
            if renoise_sigma not in (None, "current"):
                raise ValueError(f"renoise='guidance' evaluates the teacher at the current level; got renoise_sigma={renoise_sigma!r}")
            renoise_sigma = "current"
        elif renoise_sigma is None:
            renoise_sigma = "auto"
        if isinstance(renoise_sigma, str):
            if renoise_sigma not in RENOISE_LEVELS:
                raise ValueError(f"renoise_sigma must be one of {RENOISE_LEVELS}, a float or a callable, got {renoise_sigma!r}")
        elif not callable(renoise_sigma):
            renoise_sigma = check_finite_number(renoise_sigma, "renoise_sigma", minimum=0)
        else:
            check_arity(renoise_sigma, "renoise_sigma", 3, "f(i, sigma_in, sigma_out) -> float")
        self.renoise, self.renoise_sigma = renoise, renoise_sigma
        self.user_noise_sampler = check_callable(renoise_noise_sampler, "renoise_noise_sampler")
        self.seed = None if seed is None else check_seed(seed, "seed", None)

        self.sigmas = sigmas
        self.full = sigmas if full_sigmas is None else check_sigmas(full_sigmas, "full_sigmas")
        self.offset = _placement(sigmas, self.full, step_offset, full_sigmas is not None)

        several = isinstance(teacher, (list, tuple))
        teachers = list(teacher) if several else [teacher]
        if several:
            if not isinstance(lam, (list, tuple)) or len(lam) != len(teachers):
                raise ValueError(f"with {len(teachers)} teachers, lam must be a list of {len(teachers)} weights, got {lam!r}")
            lams = list(lam)
        else:
            lams = [lam]
        n_full = len(self.full) - 1
        guided = guided_step_indices(k, guided_steps, n_full)
        per_step = (f"len(guided_steps) = {len(guided)}" if guided_steps is not None
                    else f"min(k, number of steps) = {len(guided)}")
        names = [f"lam[{j}]" for j in range(len(lams))] if several else ["lam"]
        per_teacher = [_lam_values(l, n, self.full, guided, per_step) for l, n in zip(lams, names)]
        # self.lams[j][t]: weight of teacher t on absolute step j (guided steps only)
        self.lams = {j: list(step) for j, step in zip(guided, zip(*per_teacher))}
        active = any(v != 0 for step in self.lams.values() for v in step)

        shared = teacher_extra_args is None or isinstance(teacher_extra_args, Mapping)
        if shared:
            targs = [check_kwargs(teacher_extra_args, teacher_args_source)] * len(teachers)
        else:
            targs = list(teacher_extra_args) if isinstance(teacher_extra_args, (list, tuple)) else None
            if targs is None or len(targs) != len(teachers) or not all(isinstance(a, Mapping) for a in targs):
                raise ValueError(f"teacher_extra_args must be a dict or one dict per teacher ({len(teachers)}), "
                                 f"got {teacher_extra_args!r}")
        if active:
            for j, (t, a) in enumerate(zip(teachers, targs)):
                who = f"teacher[{j}]" if several else "teacher"
                if t is None:
                    raise TypeError(f"{who} is None, but lam is not 0 on a guided step: pass the teacher denoiser, or "
                                    "lam=0 (or k=0) for the plain student")
                check_callable(t, who, optional=False)
                fix = ("; pass the teacher's own keyword arguments as teacher_extra_args (or teacher_extra_args={})"
                       if teacher_args_source != "teacher_extra_args" else "")
                check_denoiser_call(t, who, a, teacher_args_source if shared else f"teacher_extra_args[{j}]", fix)
        self.teachers, self.teacher_extra_args, self.active = teachers, targs, active

        local = {j - self.offset: step for j, step in self.lams.items() if 0 <= j - self.offset < len(sigmas) - 1}
        unreachable = [i for i, step in local.items() if any(step) and (
            renoise_sigma == 0 or (renoise_sigma == "next" and sigmas[i + 1] == 0))]
        if unreachable:
            never = " (the teacher is never called)" if len(unreachable) == sum(any(v) for v in local.values()) else ""
            warn_caller(
                f"guided step(s) {[self.offset + i for i in unreachable]} call no teacher{never}: their renoise level "
                f"is 0 (renoise_sigma={renoise_sigma!r}{' on the step to sigma 0' if renoise_sigma == 'next' else ''}), "
                "where the refinement is the identity; the default renoise_sigma='auto' guides them at their own level")

        positive = [s for s in self.full if s > 0]
        self.log_range = (math.log(min(positive)), math.log(max(positive)))
        if x is not None:
            self.start(x, check)

    def start(self, x: Tensor, check: OutputChecker | None = None) -> None:
        """Bind the sample ``x`` of a new run: fresh renoise streams, and ``check`` (default: a new checker).

        Without a ``seed`` one is derived from the default RNG state of ``x.device`` now.
        """
        seed = self.seed
        if seed is not None:
            seed = check_seed(seed, "seed", x.shape[0])
        self.check = OutputChecker(x) if check is None else check
        self.batch_like = x.new_empty([x.shape[0]])  # the teacher's sigmas follow x's batch, dtype, device
        self.noise_sampler = (None if self.user_noise_sampler is None
                              else self.check.checked_sampler(self.user_noise_sampler, "renoise_noise_sampler"))
        self.noise = self.levels = None
        if self.active and (self.renoise == "random" or self.renoise_sigma == "random"):
            seed = derived_seed(x.device) if seed is None else seed
            self.noise = StepStreams(seed, "renoise", x.device)
            self.levels = StepStreams(seed, "levels")

    def _tau(self, i: int, sigma_in: float, sigma_out: float) -> float | list[float]:
        rs = self.renoise_sigma
        if rs == "auto":
            return sigma_out if sigma_out > 0 else sigma_in
        if rs == "next":
            return sigma_out
        if rs == "current":
            return sigma_in
        if rs == "random":
            lo, hi = self.log_range
            levels = [math.exp(lo + u * (hi - lo)) for u in self.levels.uniform(self.offset + i)]
            return levels[0] if len(levels) == 1 else levels
        if callable(rs):
            return check_finite_number(rs(self.offset + i, sigma_in, sigma_out), f"renoise_sigma({self.offset + i}, ...)",
                                       minimum=0)
        return rs

    def refine(self, i: int, denoised: Tensor, direction: Tensor, x_in: Tensor, sigma_in: float, sigma_out: float) -> Refined:
        """Refine the student's estimate ``denoised = S(x_in, sigma_in)`` on step ``i`` of this call's ``sigmas``.

        ``direction`` is the estimate that defines the student's noise
        ``(x_in - direction) / sigma_in`` (``denoised`` itself, or the
        unconditional estimate in CFG++); ``sigma_out`` is the noise level of the
        state the step produces.
        """
        lams = self.lams.get(self.offset + i)
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
            if self.noise_sampler is not None:
                xi = self.noise_sampler(sigma_in, max(tau) if isinstance(tau, list) else tau)
            else:
                xi = self.noise.noise(self.offset + i, denoised)
            point = denoised + scale * xi
        elif tau == sigma_in and denoised is direction:
            point = x_in  # eq. 10: teacher and student see the same input
        else:
            point = denoised + (scale / sigma_in) * (x_in - direction)
        refined, outputs = denoised, []
        for j, (lam, teacher, targs) in enumerate(zip(lams, self.teachers, self.teacher_extra_args)):
            if lam == 0:
                continue
            who = f"teacher[{j}]" if len(self.teachers) > 1 else "teacher"
            t = self.check(teacher(point, teacher_sigma, **targs), who, i, label, level="renoise level tau")
            outputs.append(t)
            refined = refined + lam * (t - denoised)
        return Refined(refined, outputs, reported)

    def raise_if_nonfinite(self) -> None:
        """Raise ``FloatingPointError`` if any teacher output so far contained NaN or inf."""
        self.check.raise_if_nonfinite()


def calls_teacher(lam: Lam | Sequence[Lam], k: int | None = None, guided_steps: Sequence[int] | None = None) -> bool:
    """Whether a run with these options may call a teacher, by :class:`TeacherRefinement`'s rule: some step is
    guided (the first ``k``, default 1, or the ``guided_steps``) and its ``lam`` is not 0 (a callable ``lam``, or one
    of several teachers', may be). Hosts use it to skip loading or encoding for a teacher a run never calls."""
    guided = (1 if check_k(k) is None else k) > 0 if guided_steps is None else len(guided_steps) > 0

    def nonzero(value: Any) -> bool:
        if callable(value):
            return True
        if isinstance(value, (Tensor, np.ndarray)) and value.ndim == 0:
            return float(value) != 0
        if isinstance(value, numbers.Real):
            return value != 0
        return any(nonzero(v) for v in value)  # per step, or one entry per teacher

    return guided and nonzero(lam)


def stage_guided_steps(sigmas: Tensor | Sequence[float], k: int | None = None, guided_steps: Sequence[int] | None = None,
                       full_sigmas: Tensor | Sequence[float] | None = None, step_offset: int | None = None) -> list[int]:
    """The absolute steps a call over ``sigmas`` (a stage of ``full_sigmas``, or the whole run) guides.

    The same rule :class:`TeacherRefinement` applies: the first ``k`` steps (default 1) or the
    ``guided_steps`` of the full run, kept where they fall in this stage. Hosts use it to skip
    preparing a teacher for a stage that calls none.
    """
    stage = check_sigmas(sigmas)
    full = stage if full_sigmas is None else check_sigmas(full_sigmas, "full_sigmas")
    offset = _placement(stage, full, step_offset, full_sigmas is not None)
    return [j for j in guided_step_indices(k, guided_steps, len(full) - 1) if offset <= j < offset + len(stage) - 1]


def _placement(sigmas: list[float], full: list[float], step_offset: int | None, given: bool) -> int:
    """The index of ``sigmas[0]`` in the full schedule ``full``: ``step_offset`` checked, or found."""
    if step_offset is None:
        return stage_offset(sigmas, full) if given else 0
    if isinstance(step_offset, bool) or not isinstance(step_offset, numbers.Integral):
        raise TypeError(f"step_offset must be an int (the index of sigmas[0] in full_sigmas), got {step_offset!r}")
    offset = int(step_offset)
    n = len(sigmas) - 1
    if not 0 <= offset <= len(full) - 1 - n:
        raise ValueError(f"step_offset={offset} does not fit a stage of {n} steps into full_sigmas of "
                         f"{len(full) - 1} steps (valid: 0 .. {len(full) - 1 - n})")
    found = stage_offset(sigmas, full)
    if found != offset:
        raise ValueError(f"sigmas[0] = {sigmas[0]:.6g} is full_sigmas[{found}], not full_sigmas[{offset}]: "
                         f"step_offset={offset} does not match the schedule")
    return offset
