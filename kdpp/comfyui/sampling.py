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
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
from comfy.k_diffusion.sampling import default_noise_sampler

from ..flow import sample_in_rf_frame
from ..hosts import is_flow_model
from ..noise import stream_seed
from ..solvers import SAMPLERS

#: the kdpp solvers offered by the nodes (``kdpp.SAMPLERS``: five solvers and four CFG++ forms)
SOLVERS = list(SAMPLERS)


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
        guided = self(x, sigma)
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
        lam, k, renoise, renoise_sigma: as in every kdpp sampler.
        full_sigmas: count ``k`` on this full schedule (:func:`guided_steps_in`) for split runs.
        guided: the number of guided steps of this call, overriding ``k`` and ``full_sigmas``.
        options: solver options (``eta``, ``s_noise``); those the solver does not take are dropped.
    """

    def __init__(self, solver: str, teacher=None, teacher_positive=None, teacher_negative=None,
                 teacher_cfg: float = 1.0, lam: float = 0.0, k: int = 1, renoise: str = "random",
                 renoise_sigma: Any = "next", full_sigmas: Tensor | None = None, guided: int | None = None,
                 **options: Any):
        if solver not in SAMPLERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver, self.fn = solver, SAMPLERS[solver]
        if lam != 0 and teacher is None:
            raise ValueError(f"lam={lam} needs a teacher MODEL")
        self.teacher, self.teacher_cfg = teacher, teacher_cfg
        self.teacher_conds = (teacher_positive, teacher_negative)
        self.lam, self.k, self.full_sigmas, self.guided = lam, k, full_sigmas, guided
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
            if seed is not None:
                options["renoise_seed"] = stream_seed(seed, 1)
            if is_flow_model(model_k):
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
                    return teacher_k(x, sigma, **targs)

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
