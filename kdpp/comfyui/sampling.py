"""Distillation++ as a ComfyUI ``SAMPLER``; imported by ComfyUI only (this module imports ``comfy``).

:class:`DistillationSampler` is ComfyUI's own ``KSAMPLER`` running a kdpp sampler through the one
hosted-run path (:func:`kdpp.hosts.host_sampler` with ComfyUI's host conventions,
:mod:`kdpp.comfyui.host`): solver noise from ComfyUI's seeded sampler, CONST models in the RF
frame, the seed, the full schedule and the stage's offset handed to the core. The student is the
model ComfyUI samples with (its guider: student MODEL, conditioning and CFG, as ``SamplerCustom``
or the KSampler node set them up). The teacher is a :class:`ComfyTeacher`: a second
``CFGGuider`` (teacher MODEL, its own conditioning and CFG) prepared by ComfyUI's own
``CFGGuider.sample`` (conds processed for the latent's shape, hooks and wrappers registered, its
model loaded together with the student's, cleaned up afterwards), called as a CFG denoiser
returning x0 at any ``(x, sigma)`` of the student's run, with the same inpainting mask. Without
teacher conditioning the teacher gets the student's (its guider's ``positive`` / ``negative``).

kdpp's warnings (:class:`kdpp.KdppWarning`) raised during a run reach ComfyUI's console
log through :mod:`logging`, each run, prefixed with the node that made the sampler.

A teacher that is a clone of the student's model with other weights (the student a LoRA on the
teacher's base) shares the base weights; ComfyUI patches LoRA weights in place, so one of the two
is loaded at a time and :class:`WeightSwitch` swaps them around every teacher call.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import uuid
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers

from .._checks import KdppWarning
from ..hosts import host_sampler
from ..refine import stage_guided_steps
from ..solvers import SAMPLERS
from .host import is_flow_sampling

#: the kdpp solvers offered by the nodes (``kdpp.SAMPLERS``: five solvers and their CFG++ forms)
SOLVERS = list(SAMPLERS)

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def warnings_to_log(source: str) -> Iterator[None]:
    """Send kdpp's warnings raised inside to ComfyUI's console log as ``"<source>: <message>"``, every time,
    naming ``renoise_sigma`` by the nodes' input name ``renoise_level``.

    ComfyUI shows :mod:`logging` records (its handler prints the message alone) in its console and
    log view; a Python warning would name the ComfyUI frame that called kdpp and show once per
    place. Other warnings pass through unchanged.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("always", KdppWarning)
        show = warnings.showwarning

        def route(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, KdppWarning):  # in the nodes' words: their input is renoise_level
                logger.warning("%s: %s", source, str(message).replace("renoise_sigma", "renoise_level"))
            else:
                show(message, category, filename, lineno, file, line)

        warnings.showwarning = route
        yield


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


class ComfyTeacher:
    """The teacher MODEL with its conditioning and CFG as a kdpp denoiser inside a ComfyUI run.

    :meth:`run` prepares it with ComfyUI's own ``CFGGuider.sample`` around the student's run; while
    that runs, calling the object evaluates the teacher's CFG x0 (``KSamplerX0Inpaint`` of the teacher
    guider, with the student's noise, latent and mask). Called outside :meth:`run` it raises.
    """

    def __init__(self, patcher, positive=None, negative=None, cfg: float = 1.0):
        self.patcher, self.conds, self.cfg = patcher, (positive, negative), cfg
        self.switch: WeightSwitch | None = None
        self._call: Callable[[Tensor, Tensor], Tensor] | None = None

    def check_compatible(self, model_wrap) -> None:
        """Refuse a teacher of another latent space, or of another kind (flow vs diffusion), than the student."""
        student_space, teacher_space = (type(m.latent_format).__name__ for m in (model_wrap.inner_model, self.patcher.model))
        if student_space != teacher_space:
            raise ValueError(f"the teacher MODEL works in the {teacher_space} latent space and the student in "
                             f"{student_space}; Distillation++ needs one latent space (the same VAE family)")
        student_flow, teacher_flow = (is_flow_sampling(m) for m in (model_wrap.inner_model.model_sampling,
                                                                     self.patcher.get_model_object("model_sampling")))
        if student_flow != teacher_flow:
            frame = {True: "a flow (CONST) model: x = (1 - t) x0 + t eps", False: "a diffusion model: x = x0 + sigma eps"}
            raise ValueError(f"the teacher MODEL is {frame[teacher_flow]}, the student {frame[student_flow]}; "
                             "Distillation++ in ComfyUI needs both of one kind (both flow or both EPS / V-prediction)")

    def teacher_conds(self, model_wrap) -> dict:
        """The teacher guider's conds: ``teacher_positive`` / ``teacher_negative`` where connected, else the
        student's (the student guider's ``positive`` / ``negative``), as ComfyUI's ``CFGGuider.set_conds`` makes them."""
        student = getattr(model_wrap, "original_conds", {})
        conds = {}
        for key, given in zip(("positive", "negative"), self.conds):
            if given is not None:
                conds[key] = comfy.sampler_helpers.convert_cond(given)
            elif key in student:  # a copy with uuids of its own (ComfyUI keys per-cond state by uuid)
                conds[key] = [{**c, "uuid": uuid.uuid4()} for c in student[key]]
            elif key == "positive" or self.cfg != 1:
                raise ValueError(f"the student's guider ({type(model_wrap).__name__}) has no {key} conditioning for "
                                 f"the teacher to share: connect teacher_{key}")
        return conds

    def run(self, model_wrap, sigmas: Tensor, noise: Tensor, latent_image: Tensor, denoise_mask, seed,
            student_run: Callable[[], Tensor]) -> Tensor:
        """``student_run()`` inside the teacher's ``CFGGuider.sample``, which prepares, loads and cleans up the teacher."""
        self.check_compatible(model_wrap)
        student_patcher = model_wrap.model_patcher
        self.switch = WeightSwitch(student_patcher, self.patcher)
        teacher_patcher = self.patcher
        if not self.switch.shared:
            # load the teacher together with the student (one load_models_gpu call), as ComfyUI loads ControlNets
            teacher_patcher = teacher_patcher.clone()
            teacher_patcher.set_additional_models("kdpp_student", [student_patcher])
        guider = comfy.samplers.CFGGuider(teacher_patcher)
        guider.original_conds = self.teacher_conds(model_wrap)
        guider.set_cfg(self.cfg)
        # the teacher guider processes the latent into its model's space itself: hand it the host's latent
        latent = latent_image
        if torch.count_nonzero(latent) > 0:
            latent = model_wrap.inner_model.process_latent_out(latent)
        mask = None if denoise_mask is None else denoise_mask[:, :1]  # ComfyUI reshapes a [B, 1, ...] mask per item
        inside = _Inside(self, sigmas, noise, student_patcher, student_run)
        try:
            guider.sample(noise, latent, inside, sigmas, denoise_mask=mask, disable_pbar=True, seed=seed)
        finally:
            self._call = None
        return inside.result

    def __call__(self, x: Tensor, sigma: Tensor, **_: Any) -> Tensor:
        if self._call is None:
            raise RuntimeError("the teacher MODEL is called outside its prepared run (ComfyTeacher.run)")
        with self.switch.teacher_call():
            try:
                return self._call(x, sigma)
            except RuntimeError as e:  # a model / conditioning mismatch surfaces as a bare torch error
                if isinstance(e, comfy.model_management.OOM_EXCEPTION):
                    raise
                raise RuntimeError(f"the teacher MODEL call failed (a common cause: teacher_positive / "
                                   f"teacher_negative from a text encoder of another model family, or none connected "
                                   f"for a teacher of another family, which then gets the student's): {e}") from e


class _Inside(comfy.samplers.Sampler):
    """The "sampler" the teacher's ``CFGGuider.sample`` runs: it binds the prepared teacher, then runs the student."""

    def __init__(self, teacher: ComfyTeacher, sigmas: Tensor, noise: Tensor, student_patcher, student_run):
        self.teacher, self.sigmas, self.noise = teacher, sigmas, noise
        self.student_patcher, self.student_run, self.result = student_patcher, student_run, None

    def sample(self, guider, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        teacher_k = comfy.samplers.KSamplerX0Inpaint(guider, self.sigmas)
        teacher_k.latent_image, teacher_k.noise = latent_image, self.noise
        targs = {**extra_args, "denoise_mask": denoise_mask}
        self.teacher._call = lambda x, sigma: teacher_k(x, sigma, **targs)
        self.teacher.switch.use(self.student_patcher)
        self.result = self.student_run()
        return self.result  # the guider post-processes (process_latent_out) its copy; the caller keeps this one


class DistillationSampler(comfy.samplers.KSAMPLER):
    """A ComfyUI ``SAMPLER``: ComfyUI's ``KSAMPLER`` running a kdpp solver, with a teacher MODEL.

    Args:
        sampler_name: a key of :data:`kdpp.SAMPLERS`.
        teacher: the teacher ModelPatcher (``None`` only with ``lam = 0``).
        teacher_positive, teacher_negative: the teacher's CONDITIONING (``None``: the student's).
        teacher_cfg: the teacher's CFG scale.
        lam, k, renoise, renoise_sigma: as in every kdpp sampler (``renoise_sigma`` is ignored
            with ``renoise="guidance"``, which uses the current level).
        full_sigmas: the whole run's schedule when this sampler runs a stage of it (split
            schedules): ``k`` counts on it, and each step draws the full run's step's renoise noise
            and random level, so the stages equal the unsplit run.
        step_offset: the index of this stage's first step in ``full_sigmas`` (default: found there).
        source: who made the sampler, the prefix of its log messages (a node's name and id).
        options: solver options (``eta``, ``s_noise``); those the solver does not take are dropped.
    """

    def __init__(self, sampler_name: str, teacher=None, teacher_positive=None, teacher_negative=None,
                 teacher_cfg: float = 1.0, lam: float = 0.0, k: int = 1, renoise: str = "random",
                 renoise_sigma: Any = "auto", full_sigmas: Tensor | None = None, step_offset: int | None = None,
                 source: str = "Distillation++", **options: Any):
        if sampler_name not in SAMPLERS:
            raise ValueError(f"sampler_name must be one of {SOLVERS}, got {sampler_name!r}")
        if lam != 0 and teacher is None:
            raise ValueError(f"{source}: lam={lam} needs a teacher: connect the pre-trained model to the teacher "
                             "input, or set lam to 0 for the plain student")
        function = host_sampler(SAMPLERS[sampler_name])
        params = inspect.signature(function).parameters
        self.teacher = None if teacher is None else ComfyTeacher(teacher, teacher_positive, teacher_negative, teacher_cfg)
        self.placement = {"k": k, "full_sigmas": full_sigmas, "step_offset": step_offset}
        extra = {key: v for key, v in options.items() if key in params}
        extra.update(teacher=self.teacher, lam=lam, renoise=renoise, renoise_sigma=None if renoise == "guidance"
                     else renoise_sigma, **self.placement)
        super().__init__(function, extra_options=extra)
        self.sampler_name, self.lam, self.source = sampler_name, lam, source

    @property
    def last_switch(self) -> "WeightSwitch | None":
        """The :class:`WeightSwitch` of the latest run that called the teacher (``None``: none did)."""
        return None if self.teacher is None else self.teacher.switch

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        run = functools.partial(super().sample, model_wrap, sigmas, extra_args, callback, noise, latent_image,
                                denoise_mask, disable_pbar)
        if self.teacher is not None:
            self.teacher.switch = None
        with warnings_to_log(self.source):
            if self.teacher is None or self.lam == 0 or not stage_guided_steps(sigmas, **self.placement):
                return run()
            return self.teacher.run(model_wrap, sigmas, noise, latent_image, denoise_mask, extra_args.get("seed"), run)
