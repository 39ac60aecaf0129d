"""Distillation++ as a ComfyUI ``SAMPLER``; imported by ComfyUI only (this module imports ``comfy``).

The student is the model ComfyUI samples with (its guider: student MODEL, conditioning and CFG,
as ``SamplerCustom`` or the KSampler node set them up). The teacher is a second ``CFGGuider``
(teacher MODEL, its own conditioning and CFG) prepared by ComfyUI's own ``CFGGuider.sample``:
its conds processed for the latent's shape, hooks and wrappers registered, its model loaded
together with the student's (``load_models_gpu`` of both, so neither evicts the other) and
cleaned up afterwards. Inside that prepared guider the kdpp solver runs, the teacher called as a
CFG denoiser returning x0 at any ``(x, sigma)`` of the student's run, with the same inpainting
mask as the student.

- Solver noise comes from ComfyUI's own ``default_noise_sampler(x, seed)``, so ``lam = 0``
  reproduces ComfyUI's built-in sampler of the same name with any ComfyUI version's seeding.
- CONST (flow) models keep ``x`` in the rectified-flow frame with ``sigma = t``: the solver runs
  in the VE frame around them (:func:`kdpp.flow.sample_in_rf_frame`).
- A teacher that is a clone of the student's model with other weights (the student a LoRA on the
  teacher's base) shares the base weights; ComfyUI patches LoRA weights in place, so one of the
  two is loaded at a time and :class:`WeightSwitch` swaps them around every teacher call.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
from comfy.k_diffusion.sampling import default_noise_sampler

from ..flow import RFHostFrame, flow_sigmas, sample_in_rf_frame
from ..hosts import is_flow_model, is_flow_sampling
from ..noise import NoiseSampler, seeded_noise_sampler, stream_seed
from ..refine import RENOISE_LEVELS
from ..solvers import SAMPLERS

#: the kdpp solvers offered by the nodes (``kdpp.SAMPLERS``: five solvers and four CFG++ forms)
SOLVERS = list(SAMPLERS)
#: the nodes' renoise levels: ``auto`` (default, :func:`auto_renoise_level`) and kdpp's own
NODE_RENOISE_LEVELS = ("auto", *RENOISE_LEVELS)
#: relative tolerance when matching a sigma to a schedule entry
_REL = 1e-6


def auto_renoise_level(i: int, sigma_in: float, sigma_out: float) -> float:
    """The node's ``renoise_level="auto"``: the next level, except on a step to ``sigma = 0`` (the current level).

    ``"next"`` on the step to 0 is ``tau = 0``: no teacher call. Every 1-step student run
    (SD-Turbo, 1-step LCM / DMD2) and every run with ``k >= steps`` guides that step; ``auto``
    renoises it at the step's own level instead, so ``lam`` acts there.
    """
    return sigma_out if sigma_out > 0 else sigma_in


def schedule_offset(sigmas: Tensor, full_sigmas: Tensor | None) -> int:
    """The index of ``sigmas[0]`` in ``full_sigmas`` (0 without it): where a split stage starts in the full run."""
    if full_sigmas is None:
        return 0
    first = float(sigmas[0])
    return sum(1 for s in full_sigmas[:-1].tolist() if s > first * (1 + _REL))


def step_renoise_sampler(x: Tensor, seed: int, sigmas: Tensor, offset: int, flow: bool) -> NoiseSampler:
    """Renoise noise that is a function of ``(seed, step of the full schedule)``, so split runs draw what unsplit ones do.

    ``sigmas`` is this stage's schedule in the host's units (``t`` for flow models, whose solver
    calls this with VE sigmas ``t / (1 - t)``) and ``offset`` its first step's index in the full
    schedule. A call at ``sigma_in`` belongs to the step ``i`` with ``sigmas[i] >= sigma_in > sigmas[i + 1]``
    (a 2S midpoint to its step); step ``offset + i`` draws from its own generator, seeded
    ``stream_seed(stream_seed(seed, 1), offset + i)`` (its draws continue within the step).
    """
    stage = sigmas[:-1].tolist()
    base = stream_seed(seed, 1)
    streams: dict[int, NoiseSampler] = {}

    def sample(sigma_in: float, tau: float) -> Tensor:
        s = float(sigma_in)
        if flow:
            s = s / (1 + s)
        step = offset + max(0, sum(1 for v in stage if v >= s * (1 - _REL)) - 1)
        if step not in streams:
            streams[step] = seeded_noise_sampler(x, stream_seed(base, step))
        return streams[step](sigma_in, tau)

    return sample


def guided_steps_in(sigmas: Tensor, k: int, full_sigmas: Tensor | None = None) -> int:
    """How many leading steps of ``sigmas`` are guided when ``k`` counts on ``full_sigmas``.

    A step is guided when its sigma is one of the first ``k`` sigmas of the full schedule, i.e.
    ``sigma_i >= full_sigmas[k - 1]`` (relative tolerance 1e-6); the guided steps of any slice are
    then a prefix of it, and the slices of a split run together guide exactly the full run's
    ``k`` steps. Without ``full_sigmas`` the first ``k`` steps of ``sigmas`` are guided.
    """
    n = len(sigmas) - 1
    if full_sigmas is None:
        return max(0, min(k, n))
    full = full_sigmas.tolist()
    if k <= 0 or len(full) < 2:
        return 0
    threshold = full[min(k, len(full) - 1) - 1]
    return sum(1 for s in sigmas[:-1].tolist() if s >= threshold * (1 - 1e-6))


def step_random_level(seed: int, full_sigmas: Tensor, offset: int, flow: bool) -> Callable[[int, float, float], float]:
    """``renoise_level="random"`` as a function of ``(seed, step of the full schedule)``: split runs draw what unsplit ones do.

    Log-uniform over the positive range of ``full_sigmas`` (host units; VE ``t / (1 - t)`` for flow
    models, ``t = 1`` capped as :class:`kdpp.flow.RFHostFrame` does), as kdpp's ``"random"`` level
    over the schedule, with step ``offset + i`` drawing from a generator seeded
    ``stream_seed(stream_seed(seed, 2), offset + i)`` (a 2S step's two stages draw two levels).
    """
    levels = flow_sigmas(full_sigmas, RFHostFrame.T_MAX) if flow else full_sigmas.to(torch.float64)
    positive = [s for s in levels.tolist() if s > 0]
    lo, hi = (math.log(min(positive)), math.log(max(positive))) if positive else (0.0, 0.0)
    base = stream_seed(seed, 2)
    generators: dict[int, torch.Generator] = {}

    def level(i: int, sigma_in: float, sigma_out: float) -> float:
        step = offset + i
        if step not in generators:
            generators[step] = torch.Generator().manual_seed(stream_seed(base, step))
        u = torch.rand((), generator=generators[step], dtype=torch.float64).item()
        return math.exp(lo + u * (hi - lo))

    return level


class WeightSwitch:
    """Makes the right one of two ModelPatchers live on a model they share.

    ComfyUI's clones share one ``BaseModel``; loading one patches its LoRA weights and object
    patches into that model in place (``load_models_gpu`` detaches the other clone and restores the
    shared backup first). When student and teacher are such clones with different weights or
    object patches, :meth:`teacher` loads the teacher for a call and the student back after it:
    two re-patches per teacher call, no second copy of the base weights. ``switches`` counts them.
    """

    def __init__(self, student, teacher):
        self.student, self.teacher = student, teacher
        self.shared = student.is_clone(teacher)
        same = bool(student.clone_has_same_weights(teacher)) and student.object_patches == teacher.object_patches
        self.needed = self.shared and not same
        self.switches = 0
        self._live = None

    def use(self, patcher) -> None:
        """Make ``patcher`` the live one on the shared model (a ``load_models_gpu`` when the weights differ)."""
        if not self.shared:
            return
        if self.needed and self._live is not patcher:
            comfy.model_management.load_models_gpu([patcher])
            self.switches += 1
        patcher.model.current_patcher = patcher  # read by ComfyUI's cond batching (hooks, prepare_state)
        self._live = patcher

    @contextlib.contextmanager
    def teacher_call(self) -> Iterator[None]:
        self.use(self.teacher)
        try:
            yield
        finally:
            self.use(self.student)


class Student:
    """The student guider (``KSamplerX0Inpaint``) as a kdpp denoiser; ``guided_and_uncond`` for CFG++.

    CFG++ reads the unconditional x0 the way ComfyUI's own CFG++ samplers do: a post-CFG
    function records ``uncond_denoised`` (with the CFG 1 shortcut disabled).
    """

    def __init__(self, model_k, extra_args: dict, cfg_pp: bool):
        self.model_k, self.extra_args = model_k, extra_args
        self.uncond = None
        if cfg_pp:
            options = extra_args.get("model_options", {}).copy()
            options = comfy.model_patcher.set_model_options_post_cfg_function(options, self._record,
                                                                              disable_cfg1_optimization=True)
            self.extra_args = {**extra_args, "model_options": options}

    def _record(self, args: dict) -> Tensor:
        self.uncond = args["uncond_denoised"]
        return args["denoised"]

    def __call__(self, x: Tensor, sigma: Tensor, **_) -> Tensor:
        return self.model_k(x, sigma, **self.extra_args)

    def guided_and_uncond(self, x: Tensor, sigma: Tensor, **_) -> tuple[Tensor, Tensor]:
        self.uncond = None  # set by ComfyUI's post-CFG hook during this call, never left from an earlier one
        guided = self(x, sigma)
        if self.uncond is None:
            raise RuntimeError("CFG++ needs the student's unconditional estimate from ComfyUI's post-CFG hook, "
                               "which did not run (another node replaced the post-CFG functions?)")
        return guided, self.uncond


class _InsideTeacherGuider(comfy.samplers.Sampler):
    """The "sampler" run by the teacher's ``CFGGuider.sample``: it runs ``body`` with the prepared teacher."""

    def __init__(self, body: Callable[..., Tensor]):
        self.body, self.result = body, None

    def sample(self, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.body(guider, extra_args, latent_image, denoise_mask)
        return self.result  # the guider post-processes (process_latent_out) its copy; the caller keeps this one


class DistillationSampler(comfy.samplers.Sampler):
    """A ComfyUI ``SAMPLER`` running a kdpp solver with a teacher guider (see the module docstring).

    Args:
        solver: a key of :data:`kdpp.SAMPLERS`.
        teacher: the teacher ModelPatcher (``None`` only with ``lam = 0``).
        teacher_positive, teacher_negative: the teacher's CONDITIONING.
        teacher_cfg: the teacher's CFG scale.
        lam, k, renoise: as in every kdpp sampler.
        renoise_sigma: ``"auto"`` (:func:`auto_renoise_level`) or as in every kdpp sampler.
        full_sigmas: count ``k`` on this full schedule (:func:`guided_steps_in`) for split runs; the
            renoise noise and random level of each step are then those of the full run's step
            (:func:`step_renoise_sampler`, :func:`step_random_level`).
        guided: the number of guided steps of this call, overriding ``k`` and ``full_sigmas``.
        start: the index of this call's first step in the full schedule (overriding ``full_sigmas``'s).
        options: solver options (``eta``, ``s_noise``); those the solver does not take are dropped.
    """

    def __init__(self, solver: str, teacher=None, teacher_positive=None, teacher_negative=None,
                 teacher_cfg: float = 1.0, lam: float = 0.0, k: int = 1, renoise: str = "random",
                 renoise_sigma: Any = "auto", full_sigmas: Tensor | None = None, guided: int | None = None,
                 start: int | None = None, **options: Any):
        if solver not in SAMPLERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver, self.fn = solver, SAMPLERS[solver]
        if lam != 0 and teacher is None:
            raise ValueError(f"lam={lam} needs a teacher MODEL")
        self.teacher, self.teacher_cfg = teacher, teacher_cfg
        self.teacher_conds = (teacher_positive, teacher_negative)
        self.lam, self.k, self.full_sigmas, self.guided, self.start = lam, k, full_sigmas, guided, start
        if renoise_sigma == "auto":
            renoise_sigma = auto_renoise_level
        self.renoise = {"renoise": renoise, "renoise_sigma": None if renoise == "guidance" else renoise_sigma}
        params = inspect.signature(self.fn).parameters
        self.options = {key: v for key, v in options.items() if key in params}
        self.takes_noise = "noise_sampler" in params
        self.last_switch: WeightSwitch | None = None

    def guided_steps(self, sigmas: Tensor) -> int:
        return max(0, min(self.guided, len(sigmas) - 1)) if self.guided is not None else guided_steps_in(
            sigmas, self.k, self.full_sigmas)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        # as ComfyUI's KSAMPLER.sample, with a kdpp solver in place of the k-diffusion one
        extra_args["denoise_mask"] = denoise_mask
        model_k = comfy.samplers.KSamplerX0Inpaint(model_wrap, sigmas)
        model_k.latent_image, model_k.noise = latent_image, noise
        model_sampling = model_wrap.inner_model.model_sampling
        x = model_sampling.noise_scaling(sigmas[0], noise, latent_image, self.max_denoise(model_wrap, sigmas))
        steps = len(sigmas) - 1
        k_callback = None if callback is None else (lambda d: callback(d["i"], d["denoised"], d["x"], steps))
        k = self.guided_steps(sigmas)

        def run(teacher) -> Tensor:
            student = Student(model_k, extra_args, cfg_pp="cfg_pp" in self.solver)
            options = dict(self.options, **self.renoise, callback=k_callback, disable=disable_pbar)
            seed = extra_args.get("seed")
            if self.takes_noise:
                options["noise_sampler"] = default_noise_sampler(x, seed=seed)  # the host's own seeding
            flow = is_flow_model(model_k)
            if seed is not None:
                offset = self.start if self.start is not None else schedule_offset(sigmas, self.full_sigmas)
                options["renoise_noise_sampler"] = step_renoise_sampler(x, seed, sigmas, offset, flow)
                if options["renoise_sigma"] == "random":
                    full = sigmas if self.full_sigmas is None else self.full_sigmas
                    options["renoise_sigma"] = step_random_level(seed, full, offset, flow)
            if flow:
                return sample_in_rf_frame(self.fn, student, teacher, x, sigmas, self.lam, k, **options)
            return self.fn(student, teacher, x, sigmas, self.lam, k, **options)

        self.last_switch = None
        if self.lam == 0 or k == 0:
            samples = run(None)
        else:
            samples = self._with_teacher(model_wrap, model_k, sigmas, extra_args.get("seed"), denoise_mask, run)
        return model_sampling.inverse_noise_scaling(sigmas[-1], samples)

    def _with_teacher(self, model_wrap, model_k, sigmas: Tensor, seed, denoise_mask, run) -> Tensor:
        """``run(teacher)`` inside the teacher's ``CFGGuider.sample`` (ComfyUI prepares, loads and cleans it up)."""
        student_patcher = model_wrap.model_patcher
        teacher_patcher = self.teacher
        student_space, teacher_space = (type(m.latent_format).__name__
                                        for m in (model_wrap.inner_model, teacher_patcher.model))
        if student_space != teacher_space:
            raise ValueError(f"the teacher MODEL works in the {teacher_space} latent space and the student in "
                             f"{student_space}; Distillation++ needs one latent space (the same VAE family)")
        student_flow, teacher_flow = (is_flow_sampling(m) for m in (model_wrap.inner_model.model_sampling,
                                                                     teacher_patcher.get_model_object("model_sampling")))
        if student_flow != teacher_flow:
            frame = {True: "a flow (CONST) model: x = (1 - t) x0 + t eps", False: "a diffusion model: x = x0 + sigma eps"}
            raise ValueError(f"the teacher MODEL is {frame[teacher_flow]}, the student {frame[student_flow]}; "
                             "Distillation++ in ComfyUI needs both of one kind (both flow or both EPS / V-prediction)")
        switch = self.last_switch = WeightSwitch(student_patcher, teacher_patcher)
        if not switch.shared:
            # load the teacher together with the student (one load_models_gpu call), as ComfyUI loads ControlNets
            teacher_patcher = teacher_patcher.clone()
            teacher_patcher.set_additional_models("kdpp_student", [student_patcher])
        guider = comfy.samplers.CFGGuider(teacher_patcher)
        guider.set_conds(*self.teacher_conds)
        guider.set_cfg(self.teacher_cfg)

        def body(teacher_wrap, teacher_extra_args: dict, teacher_latent: Tensor, teacher_mask) -> Tensor:
            teacher_k = comfy.samplers.KSamplerX0Inpaint(teacher_wrap, sigmas)
            teacher_k.latent_image, teacher_k.noise = teacher_latent, model_k.noise
            targs = {**teacher_extra_args, "denoise_mask": teacher_mask}

            def teacher(x: Tensor, sigma: Tensor, **_) -> Tensor:
                with switch.teacher_call():
                    try:
                        return teacher_k(x, sigma, **targs)
                    except RuntimeError as e:  # a model / conditioning mismatch surfaces as a bare torch error
                        if isinstance(e, comfy.model_management.OOM_EXCEPTION):
                            raise
                        raise RuntimeError(f"the teacher MODEL call failed (a common cause: teacher_positive / "
                                           f"teacher_negative from a text encoder of another model family): {e}") from e

            switch.use(student_patcher)
            return run(teacher)

        # the teacher guider processes the latent into its model's space itself: hand it the host's latent
        latent = model_k.latent_image
        if torch.count_nonzero(latent) > 0:
            latent = model_wrap.inner_model.process_latent_out(latent)
        mask = None if denoise_mask is None else denoise_mask[:, :1]  # ComfyUI reshapes a [B, 1, ...] mask per item
        inside = _InsideTeacherGuider(body)
        guider.sample(model_k.noise, latent, inside, sigmas, denoise_mask=mask, disable_pbar=True, seed=seed)
        return inside.result
