"""The Distillation++ ComfyUI nodes; imported by ComfyUI (through the ``custom_nodes`` shim) only.

- **Distillation++ Sampler** (``DistillationPPSampler``): a ``SAMPLER`` for ``SamplerCustom`` /
  ``SamplerCustomAdvanced``, next to ComfyUI's sampler nodes (``sampling/custom_sampling/samplers``).
- **Distillation++ KSampler** (``DistillationPPKSampler``) and **Distillation++ KSampler
  (Advanced)** (``DistillationPPKSamplerAdvanced``): ComfyUI's ``KSampler`` and
  ``KSamplerAdvanced`` with their inputs, names and order, plus the teacher inputs, next to them
  (``sampling``). An API prompt written for either ports by changing its ``class_type`` and
  adding the teacher inputs.

The teacher MODEL and its conditioning are optional inputs: ``lam = 0`` runs the plain student
without them, and unconnected teacher conditioning is the student's.
"""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..refine import RENOISE_LEVELS, RENOISE_MODES
from .sampling import SOLVERS, DistillationSampler

#: the teacher's MODEL and CONDITIONING: optional links (``lam = 0`` needs none)
TEACHER_LINKS = {
    "teacher": ("MODEL", {"tooltip": "The pre-trained teacher (e.g. the base checkpoint without the distillation "
                                     "LoRA). Needed when lam is not 0."}),
    "teacher_positive": ("CONDITIONING", {"tooltip": "The teacher's positive conditioning (unconnected: the "
                                                     "student's positive)."}),
    "teacher_negative": ("CONDITIONING", {"tooltip": "The teacher's negative conditioning (unconnected: the "
                                                     "student's negative)."}),
}
#: the guidance settings: widgets
TEACHER_WIDGETS = {
    "teacher_cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The teacher's CFG scale (the paper uses 7.5; 6.0 with DPM++ 2S a)."}),
    "lam": ("FLOAT", {"default": 0.1, "min": -10.0, "max": 10.0, "step": 0.01,
                      "tooltip": "Teacher guidance scale lam: R(D) = D + lam (T(D + tau xi, tau) - D), typically 0.05 .. 1 "
                                 "(0.1: the authors' value for SDXL-Lightning / Turbo, and the safest value measured on trained students). 0 = the plain student (the "
                                 "teacher is not loaded to the GPU nor called)."}),
    "k": ("INT", {"default": 1, "min": 0, "max": 10000,
                  "tooltip": "Guide the first k steps of the full schedule (the paper uses 1). 1-step students: k = 1 "
                             "guides the only step (renoise_level auto renoises it at its own level)."}),
    "renoise": (list(RENOISE_MODES), {"default": "random",
                                       "tooltip": "Renoising noise xi: random (paper Alg. 1), deterministic (the student's "
                                                  "noise) or guidance (paper eq. 10: teacher and student at the same input)."}),
    "renoise_level": (list(RENOISE_LEVELS), {"default": "auto",
                                             "tooltip": "Renoising level tau: auto (default) = the next sigma, except on the "
                                                        "step to sigma 0 (the last step: any 1-step run, or k >= steps), where "
                                                        "the next sigma 0 would skip the teacher, the current one; next (the "
                                                        "paper's; a guided step to 0 then calls no teacher), current, or "
                                                        "random (ignored by renoise=guidance, which uses the current one)."}),
}
HIDDEN = {"unique_id": "UNIQUE_ID"}
SAMPLER_NAME = (SOLVERS, {"default": "euler",
                          "tooltip": "The kdpp solver (the CFG++ forms use the student's unconditional x0)."})
#: KSampler's inputs with defaults for distilled students (few steps, CFG 1); kdpp's solvers as sampler_name
STUDENT_MODEL = ("MODEL", {"tooltip": "The distilled student (Lightning, Turbo, DMD2, LCM, Hyper-SD, lightx2v or their LoRAs)."})
SEED = ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True,
                "tooltip": "The seed of the initial noise, the solver noise and the renoise noise."})
STEPS = ("INT", {"default": 4, "min": 1, "max": 10000})
CFG = ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                 "tooltip": "The student's CFG scale (distilled students usually run without CFG: 1)."})
SCHEDULER = (comfy.samplers.KSampler.SCHEDULERS, {"default": "sgm_uniform"})


def source(node: str, unique_id) -> str:
    """How log messages and errors name a node: its display name and, inside a graph, its id."""
    name = NODE_DISPLAY_NAME_MAPPINGS[node]
    return name if unique_id is None else f"{name} (node {unique_id})"


class DistillationPPSampler:
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced: a kdpp solver whose first k steps the teacher refines."""

    DESCRIPTION = ("Distillation++: the distilled student (the model SamplerCustom samples) is corrected by a "
                   "pre-trained teacher on its first k steps.")
    CATEGORY = "sampling/custom_sampling/samplers"
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "sampler_name": SAMPLER_NAME,
                **TEACHER_WIDGETS,
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                  "tooltip": "Ancestral noise amount (euler_ancestral, dpmpp_2s_ancestral)."}),
                "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                      "tooltip": "Solver noise scale (ancestral solvers)."}),
            },
            "optional": {
                **TEACHER_LINKS,
                "full_sigmas": ("SIGMAS", {"tooltip": "For split schedules (SplitSigmas, two stages): the full schedule "
                                                      "on which k counts and the renoise noise is drawn per step, so a split run "
                                                      "guides as often as, and equals, the unsplit one."}),
            },
            "hidden": HIDDEN,
        }

    def get_sampler(self, sampler_name, teacher_cfg, lam, k, renoise, renoise_level, eta, s_noise, teacher=None,
                    teacher_positive=None, teacher_negative=None, full_sigmas=None, unique_id=None):
        guidance = dict(teacher=teacher, teacher_positive=teacher_positive, teacher_negative=teacher_negative,
                        teacher_cfg=teacher_cfg, lam=lam, k=k, renoise=renoise, renoise_level=renoise_level)
        return (distillation_sampler(sampler_name, guidance, source("DistillationPPSampler", unique_id),
                                     full_sigmas=full_sigmas, eta=eta, s_noise=s_noise),)


class DistillationPPKSampler:
    """ComfyUI's KSampler (its inputs, names and order) with a teacher: a kdpp solver whose first k steps it refines."""

    DESCRIPTION = ("Distillation++ KSampler: KSampler with a kdpp solver; the teacher refines the first k steps. "
                   "A KSampler API prompt ports by changing the class_type and adding the teacher inputs.")
    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": STUDENT_MODEL,
                "seed": SEED,
                "steps": STEPS,
                "cfg": CFG,
                "sampler_name": SAMPLER_NAME,
                "scheduler": SCHEDULER,
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Below 1 (img2img): `steps` steps ending a longer schedule, as KSampler; "
                                                 "k counts on this node's steps."}),
                **TEACHER_WIDGETS,
            },
            "optional": TEACHER_LINKS,
            "hidden": HIDDEN,
        }

    def sample(self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
               teacher_cfg, lam, k, renoise, renoise_level, teacher=None, teacher_positive=None, teacher_negative=None,
               unique_id=None):
        guidance = dict(teacher=teacher, teacher_positive=teacher_positive, teacher_negative=teacher_negative,
                        teacher_cfg=teacher_cfg, lam=lam, k=k, renoise=renoise, renoise_level=renoise_level)
        return ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, guidance,
                       source("DistillationPPKSampler", unique_id), denoise=denoise)


class DistillationPPKSamplerAdvanced:
    """ComfyUI's KSamplerAdvanced (its inputs, names and order) with a teacher; k counts on the full schedule."""

    DESCRIPTION = ("Distillation++ KSampler (Advanced): KSamplerAdvanced with a kdpp solver; the teacher refines the "
                   "first k steps of the full schedule, also across start/end-step stages. A KSamplerAdvanced API prompt "
                   "ports by changing the class_type and adding the teacher inputs.")
    CATEGORY = "sampling"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": STUDENT_MODEL,
                "add_noise": (["enable", "disable"],),
                "noise_seed": SEED,
                "steps": STEPS,
                "cfg": CFG,
                "sampler_name": SAMPLER_NAME,
                "scheduler": SCHEDULER,
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000,
                                          "tooltip": "k counts on the full schedule: a stage starting at step s guides steps s .. k-1."}),
                "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
                "return_with_leftover_noise": (["disable", "enable"],),
                **TEACHER_WIDGETS,
            },
            "optional": TEACHER_LINKS,
            "hidden": HIDDEN,
        }

    def sample(self, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
               start_at_step, end_at_step, return_with_leftover_noise, teacher_cfg, lam, k, renoise, renoise_level,
               teacher=None, teacher_positive=None, teacher_negative=None, unique_id=None):
        guidance = dict(teacher=teacher, teacher_positive=teacher_positive, teacher_negative=teacher_negative,
                        teacher_cfg=teacher_cfg, lam=lam, k=k, renoise=renoise, renoise_level=renoise_level)
        return ksample(model, noise_seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, guidance,
                       source("DistillationPPKSamplerAdvanced", unique_id), add_noise=_enabled(add_noise, "add_noise"),
                       start_at_step=start_at_step, end_at_step=end_at_step,
                       leftover_noise=_enabled(return_with_leftover_noise, "return_with_leftover_noise"))


def distillation_sampler(sampler_name: str, guidance: dict, source: str, **options) -> DistillationSampler:
    """The :class:`DistillationSampler` of a node's ``sampler_name`` and teacher inputs (``guidance``)."""
    return DistillationSampler(sampler_name, guidance["teacher"], guidance["teacher_positive"],
                               guidance["teacher_negative"], guidance["teacher_cfg"], guidance["lam"], guidance["k"],
                               guidance["renoise"], guidance["renoise_level"], source=source, **options)


def ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, guidance: dict,
            source: str, denoise=1.0, add_noise=True, start_at_step=0, end_at_step=10000, leftover_noise=False):
    """ComfyUI's ``common_ksampler`` (schedule, start/end slicing, noise, mask, preview) with a
    :class:`DistillationSampler` given the full schedule and the stage's offset."""
    sigmas = full_sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, scheduler=scheduler,
                                                   denoise=denoise, model_options=model.model_options).sigmas
    # KSamplerAdvanced's start/end slicing (comfy.samplers.KSampler.sample)
    if end_at_step < len(sigmas) - 1:
        sigmas = sigmas[:end_at_step + 1].clone()
        if not leftover_noise:
            sigmas[-1] = 0
    out = dict(latent_image)
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    if start_at_step >= len(sigmas) - 1:
        out["samples"] = latent
        return (out,)
    sigmas = sigmas[start_at_step:]
    sampler = distillation_sampler(sampler_name, guidance, source, full_sigmas=full_sigmas, step_offset=start_at_step)
    if add_noise:
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    else:
        noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
    callback = latent_preview.prepare_callback(model, steps)
    out["samples"] = comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent,
                                                noise_mask=latent_image.get("noise_mask"), callback=callback,
                                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    return (out,)


def _enabled(value: str, name: str) -> bool:
    """KSamplerAdvanced's ``"enable"`` / ``"disable"`` combo values as a bool (anything else is refused by name)."""
    if value not in ("enable", "disable"):
        raise ValueError(f"{name} must be 'enable' or 'disable' (as in KSamplerAdvanced), got {value!r}")
    return value == "enable"


NODE_CLASS_MAPPINGS = {
    "DistillationPPSampler": DistillationPPSampler,
    "DistillationPPKSampler": DistillationPPKSampler,
    "DistillationPPKSamplerAdvanced": DistillationPPKSamplerAdvanced,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DistillationPPSampler": "Distillation++ Sampler",
    "DistillationPPKSampler": "Distillation++ KSampler",
    "DistillationPPKSamplerAdvanced": "Distillation++ KSampler (Advanced)",
}
