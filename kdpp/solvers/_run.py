"""What every kdpp sampler shares: validation, the student call, the refinement, callbacks."""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import trange

from .._checks import OutputChecker, check_callable, check_denoiser_call, check_kwargs, check_seed, check_sigmas, check_x
from .._shape import sigma_batch
from ..noise import NoiseSampler, StepStreams
from ..refine import Denoiser, Lam, Refined, RenoiseSigma, TeacherRefinement

COMMON_ARGS = """
    Models get ``sigma`` as a ``[B]`` tensor of dtype ``torch.promote_types(x.dtype,
    torch.float32)`` (float32 for fp16 / bf16 / fp32 samples); an output in a wider float
    type than ``x`` is cast to ``x``'s dtype.

    Args:
        student: the distilled VE denoiser ``S(x, sigma, **extra_args) -> x0``
            (with ``cfg_pp=True``: an object with ``guided_and_uncond(x, sigma,
            **extra_args) -> (D_w, D_u)``, such as :class:`kdpp.CFGDenoiser`).
        teacher: the VE denoiser ``T(x, sigma, **teacher_extra_args) -> x0``, a
            sequence of them (``lam`` then holds one weight per teacher), or
            ``None`` when no step is guided.
        x: the initial noisy sample ``x_0 = sigma_0 * noise``, shape ``[B, ...]``.
        sigmas: the schedule ``s_0 > s_1 > ... > s_N``, 1-D, on any device and
            dtype; ``s_N`` is 0 for a full run (a positive last entry stops there).
        lam: the teacher guidance scale: a float, one float per guided step (in
            the order of ``guided_steps`` as given; with ``k``, increasing step
            order), or ``f(i, sigma_i) -> float`` (evaluated at the guided steps);
            0 makes the sampler the plain student. No value is free on trained students:
            ``0.1`` with ``k = 1`` is the safest measured, 0.5 - 1 helps students that miss
            the prompt and costs others more (docs/faq.md, "Which lam and k?").
        k: guide the first ``k`` steps (the paper uses 1); 0 calls no teacher;
            ``None`` (default) means 1 unless ``guided_steps`` is given.
        guided_steps: the step indices to guide instead of the first ``k``: indices
            into the full schedule (``full_sigmas``, by default ``sigmas``), ``0 .. N - 1``
            with ``N`` its number of steps, negative ones counting from the end (``-1``:
            the last step); an empty sequence guides nothing. Repeated or out-of-range
            indices, or ``k`` given as well, raise ``ValueError``. Step ``i`` is refined as
            ``R(D; i) = D + lam_i (T(D + tau_i xi, tau_i) - D)`` if ``i`` is guided,
            ``R(D; i) = D`` (no teacher call) otherwise.
        extra_args: keyword arguments for the student (k-diffusion convention).
        teacher_extra_args: keyword arguments for the teacher (one dict per
            teacher allowed); defaults to ``extra_args`` (a teacher that cannot take
            them is refused before sampling, naming both).
        callback: called once per step with k-diffusion's keys ``x, i, sigma,
            sigma_hat, denoised`` (``sigma`` and ``sigma_hat`` 0-d tensors like
            ``sigmas``; ``denoised`` is the refined estimate) plus
            ``student_denoised`` and, only on steps that called the teacher,
            ``teacher_denoised`` (a list with several teachers) and ``renoise_sigma``
            (a float; with per-item random levels, the teacher's ``[B]`` sigma tensor;
            absent on unguided steps and where ``lam_i = 0`` or ``tau = 0``).
        disable: disable the tqdm progress bar.
        renoise: renoising noise ``xi``: ``"random"``, ``"deterministic"`` or
            ``"guidance"`` (paper eq. 10); see :class:`kdpp.TeacherRefinement`.
        renoise_sigma: renoising level ``tau``; ``None`` (the default) is ``"auto"``
            (``sigma_{i+1}``, or ``sigma_i`` on a step to 0; ``"current"`` with ``renoise="guidance"``), ``"next"``, ``"current"``, ``"random"``, a float or
            ``f(i, sigma_in, sigma_out)``; see :class:`kdpp.TeacherRefinement`.
        seed: the run's seed, an int or one int per batch item: solver noise of absolute
            step ``j`` (unless ``noise_sampler`` is given), renoise noise and random levels
            each from their own stream (the map is in :mod:`kdpp.noise`). ``None``: solver
            noise from ``torch.randn_like`` (k-diffusion's default) and a renoise seed
            derived from the global RNG state without advancing it.
        renoise_noise_sampler: ``(sigma, tau) -> Tensor``, replaces the seeded renoise noise.
        full_sigmas: the whole run's schedule when this call samples a stage of it (a
            split schedule); ``k``, ``guided_steps``, random levels and the noise streams'
            steps count on it, so the stages of a split run equal the unsplit run (except
            where the solver, as in k-diffusion, uses the stage alone: DPM++ 2M's history
            and Euler's ``s_churn`` spread over the stage's steps).
        step_offset: the index of ``sigmas[0]`` in ``full_sigmas`` (default: found there).{cfg_pp}{own}

    Returns:
        The final sample, with the dtype, device and shape of ``x``.
    """


CFG_PP_ARG = """
        cfg_pp: CFG++ form: the direction term uses the student's unconditional
            estimate ``D_u`` and the leading term its guided estimate ``D_w``."""


def documented(fn: Callable) -> Callable:
    """Fill the shared ``{args}`` section of a sampler docstring; the solver's own args follow it there."""
    cfg_pp = CFG_PP_ARG if "cfg_pp" in inspect.signature(fn).parameters else ""
    head, own = fn.__doc__.split("{args}")
    fn.__doc__ = head + COMMON_ARGS.strip().replace("{cfg_pp}", cfg_pp).replace("{own}", own.rstrip()) + "\n"
    return fn


def cfg_pp_variant(sampler: Callable, form: str = "cfg_pp") -> Callable:
    """The named CFG++ form of ``sampler`` (``sampler(..., cfg_pp=True)``), named ``sample_<solver>_<form>_distpp``.

    A form that differs from a host's built-in sampler of the ``cfg_pp`` name gets a ``form`` of its own,
    so that no name means two samplers in one host.
    """

    @functools.wraps(sampler)
    def variant(*args, **kwargs):
        return sampler(*args, cfg_pp=True, **kwargs)

    signature = inspect.signature(sampler)
    variant.__signature__ = signature.replace(parameters=[p for p in signature.parameters.values() if p.name != "cfg_pp"])
    variant.__name__ = variant.__qualname__ = sampler.__name__.replace("_distpp", f"_{form}_distpp")
    variant.__doc__ = f"CFG++ form of :func:`{sampler.__name__}`: ``{sampler.__name__}(..., cfg_pp=True)``.\n"
    variant.cfg_pp = True  # hosts read it: the student must provide guided_and_uncond
    return variant


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """``(sigma_down, sigma_up)`` with ``sigma_down^2 + sigma_up^2 = sigma_to^2`` (k-diffusion's rule)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


def step(lead: Tensor, direction: Tensor, x: Tensor, ratio: float) -> Tensor:
    """``lead + ratio * (x - direction)`` as one fused ``lerp`` (plus ``lead - direction`` when they differ)."""
    out = torch.lerp(direction, x, ratio)
    return out if lead is direction else out + (lead - direction)


class SamplerRun:
    """The state one sampler call shares between its steps."""

    def __init__(
        self,
        student: Denoiser,
        teacher: Denoiser | Sequence[Denoiser] | None,
        x: Tensor,
        sigmas: Tensor | Sequence[float],
        lam: Lam | Sequence[Lam],
        k: int | None,
        *,
        guided_steps: Sequence[int] | None,
        extra_args: Mapping[str, Any] | None,
        teacher_extra_args: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None,
        callback: Callable[[dict], Any] | None,
        disable: bool | None,
        renoise: str,
        renoise_sigma: RenoiseSigma,
        seed: int | Sequence[int] | None,
        renoise_noise_sampler: NoiseSampler | None,
        full_sigmas: Tensor | Sequence[float] | None,
        step_offset: int | None,
        cfg_pp: bool,
        noise_sampler: NoiseSampler | None = None,
    ):
        check_x(x)
        self.sigmas = check_sigmas(sigmas)
        self.sigma_values = sigmas if isinstance(sigmas, Tensor) else torch.tensor(self.sigmas, dtype=torch.float64)
        check_callable(student, "student", optional=False)
        if not isinstance(cfg_pp, bool):
            raise TypeError(f"cfg_pp must be True or False, got {cfg_pp!r}")
        if cfg_pp and not callable(getattr(student, "guided_and_uncond", None)):
            raise TypeError(
                "cfg_pp=True needs a student with guided_and_uncond(x, sigma, **extra_args) -> (guided, uncond), "
                "such as kdpp.CFGDenoiser"
            )
        if not (disable is None or isinstance(disable, int)):
            raise TypeError(f"disable must be True, False or None, got {disable!r}")
        self.student, self.cfg_pp, self.disable = student, cfg_pp, disable
        self.callback = check_callable(callback, "callback")
        self.extra_args = check_kwargs(extra_args, "extra_args")
        check_denoiser_call(student.guided_and_uncond if cfg_pp else student, "student", self.extra_args, "extra_args")
        self.check = OutputChecker(x)
        self.refinement = TeacherRefinement(
            teacher, lam, k, self.sigmas, x,
            guided_steps=guided_steps,
            renoise=renoise,
            renoise_sigma=renoise_sigma,
            teacher_extra_args=self.extra_args if teacher_extra_args is None else teacher_extra_args,
            seed=seed,
            renoise_noise_sampler=renoise_noise_sampler,
            full_sigmas=full_sigmas,
            step_offset=step_offset,
            check=self.check,
            teacher_args_source="teacher_extra_args" if teacher_extra_args is not None else
            "extra_args (teacher_extra_args defaults to it)",
        )
        self.offset = self.refinement.offset
        noise_sampler = check_callable(noise_sampler, "noise_sampler")
        self.user_noise = None if noise_sampler is None else self.check.checked_sampler(noise_sampler, "noise_sampler")
        self.seeded_noise = (None if seed is None or noise_sampler is not None
                             else StepStreams(check_seed(seed, "seed", x.shape[0]), "solver", x.device))

    def steps(self) -> Iterable[int]:
        return trange(len(self.sigmas) - 1, disable=self.disable)

    def noise(self, i: int, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
        """The solver noise of step ``i``: ``noise_sampler(sigma, sigma_next)``, the seed's solver stream of the
        absolute step, or ``torch.randn_like(x)`` (k-diffusion's default) without either."""
        if self.user_noise is not None:
            return self.user_noise(sigma, sigma_next)
        if self.seeded_noise is not None:
            return self.seeded_noise.noise(self.offset + i, x)
        return torch.randn_like(x)

    def denoise(self, x: Tensor, sigma: float, i: int) -> tuple[Tensor, Tensor]:
        """The student's leading and direction estimates ``(D, D)``; CFG++: ``(D_w, D_u)``."""
        if not self.cfg_pp:
            denoised = self.check(self.student(x, sigma_batch(sigma, x), **self.extra_args), "student", i, sigma)
            return denoised, denoised
        out = self.student.guided_and_uncond(x, sigma_batch(sigma, x), **self.extra_args)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise TypeError(f"student.guided_and_uncond must return (guided, uncond), got {type(out).__name__}")
        return self.check(out[0], "student", i, sigma), self.check(out[1], "student (unconditional)", i, sigma)

    def refine(self, i: int, denoised: Tensor, direction: Tensor, x_in: Tensor, sigma_in: float, sigma_out: float) -> Refined:
        return self.refinement.refine(i, denoised, direction, x_in, sigma_in, sigma_out)

    def report(self, i: int, x: Tensor, student_denoised: Tensor, refined: Refined, gamma: float = 0.0) -> None:
        """Call the callback with k-diffusion's keys plus the student's and teacher's estimates.

        ``sigma_hat = sigmas[i] * (gamma + 1)`` is a 0-d tensor like ``sigmas``, as in k-diffusion.
        """
        if self.callback is None:
            return
        sigma = self.sigma_values[i]
        info = {
            "x": x, "i": i, "sigma": sigma, "sigma_hat": sigma * (gamma + 1),
            "denoised": refined.denoised, "student_denoised": student_denoised,
        }
        if refined.teacher_denoised:
            many = len(self.refinement.teachers) > 1
            info["teacher_denoised"] = refined.teacher_denoised if many else refined.teacher_denoised[0]
            info["renoise_sigma"] = refined.renoise_sigma
        self.callback(info)

    def finish(self, x: Tensor) -> Tensor:
        self.check.raise_if_nonfinite()
        return x
