"""The Distillation++ ComfyUI nodes; imported by ComfyUI (through the ``custom_nodes`` shim) only."""
from __future__ import annotations

import torch

import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview

from ..refine import RENOISE_LEVELS, RENOISE_MODES
from .sampling import SOLVERS, DistillationSampler

CATEGORY = "sampling/distillation++"

TEACHER_INPUTS = {
    "teacher": ("MODEL", {"tooltip": "The pre-trained teacher model (e.g. the base checkpoint without the distillation LoRA)."}),
    "teacher_positive": ("CONDITIONING", {"tooltip": "The teacher's positive conditioning."}),
    "teacher_negative": ("CONDITIONING", {"tooltip": "The teacher's negative conditioning."}),
    "teacher_cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                              "tooltip": "The teacher's CFG scale (the paper uses 7.5; 6.0 with DPM++ 2S a)."}),
    "lam": ("FLOAT", {"default": 0.5, "min": -10.0, "max": 10.0, "step": 0.01,
                      "tooltip": "Teacher guidance scale lam: R(D) = D + lam (T(D + tau xi, tau) - D). 0 = the plain student "
                                 "(the teacher is not loaded to the GPU nor called; its loader node still runs)."}),
    "k": ("INT", {"default": 1, "min": 0, "max": 10000,
                  "tooltip": "Guide the first k steps (the paper uses 1). Split runs: see full_sigmas / start_at_step. "
                             "1-step students: k = 1 guides the only step (renoise_level auto renoises it at its own level)."}),
    "renoise": (list(RENOISE_MODES), {"default": "random",
                                       "tooltip": "Renoising noise xi: random (paper Alg. 1), deterministic (the student's noise) "
                                                  "or guidance (paper eq. 10: teacher and student at the same input)."}),
    "renoise_level": (list(RENOISE_LEVELS), {"default": "auto",
                                                  "tooltip": "Renoising level tau: auto (default) = the next sigma, except on the "
                                                             "step to sigma 0 (the last step: any 1-step run, or k >= steps), where "
                                                             "the next sigma 0 would skip the teacher, the current one; next (the "
                                                             "paper's; a guided step to 0 then calls no teacher), current, or "
                                                             "random (ignored by renoise=guidance, which uses the current one)."}),
}
SOLVER_INPUT = (SOLVERS, {"default": "euler", "tooltip": "The kdpp solver (CFG++ forms use the student's unconditional x0)."})


class DistillationPPSampler:
    """A SAMPLER for SamplerCustom / SamplerCustomAdvanced: a kdpp solver whose first k steps the teacher refines."""

    DESCRIPTION = ("Distillation++: the distilled student (the model SamplerCustom samples) is corrected by a "
                   "pre-trained teacher on its first k steps.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("SAMPLER",)
    FUNCTION = "get_sampler"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "solver": SOLVER_INPUT,
                **TEACHER_INPUTS,
                "eta": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                  "tooltip": "Ancestral noise amount (euler_ancestral, dpmpp_2s_ancestral)."}),
                "s_noise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01,
                                      "tooltip": "Solver noise scale (ancestral solvers)."}),
            },
            "optional": {
                "full_sigmas": ("SIGMAS", {"tooltip": "For split schedules (SplitSigmas, two stages): the full schedule "
                                                      "on which k counts and the renoise noise is drawn per step, so a split run "
                                                      "guides as often as, and equals, the unsplit one."}),
            },
        }

    def get_sampler(self, solver, teacher, teacher_positive, teacher_negative, teacher_cfg, lam, k, renoise,
                    renoise_level, eta, s_noise, full_sigmas=None):
        return (DistillationSampler(solver, teacher, teacher_positive, teacher_negative, teacher_cfg, lam, k, renoise,
                                    renoise_level, full_sigmas=full_sigmas, eta=eta, s_noise=s_noise),)


class DistillationPPKSampler:
    """All in one, like KSamplerAdvanced: student and teacher models, seed, steps, scheduler, conditioning for each."""

    DESCRIPTION = ("Distillation++ KSampler: samples the student with a kdpp solver; the teacher refines the first k "
                   "steps of the full schedule (also across start/end-step splits).")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The distilled student (Lightning, Turbo, DMD2, LCM, Hyper-SD or their LoRAs)."}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": True}),
                "steps": ("INT", {"default": 4, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01,
                                  "tooltip": "The student's CFG scale (distilled students usually run without CFG: 1)."}),
                "solver": SOLVER_INPUT,
                "scheduler": (comfy.samplers.SCHEDULER_NAMES, {"default": "sgm_uniform"}),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                **TEACHER_INPUTS,
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "Below 1 (img2img): a schedule of `steps` steps ending the longer one; "
                                                 "k counts on this node's steps."}),
            },
            "optional": {
                "add_noise": (["enable", "disable"], {"default": "enable", "tooltip": "As KSamplerAdvanced's."}),
                "start_at_step": ("INT", {"default": 0, "min": 0, "max": 10000,
                                          "tooltip": "k counts on the full schedule: a stage starting at step s guides steps s..k-1."}),
                "end_at_step": ("INT", {"default": 10000, "min": 0, "max": 10000}),
                "return_with_leftover_noise": (["disable", "enable"], {"default": "disable",
                                                                        "tooltip": "As KSamplerAdvanced's."}),
            },
        }

    def sample(self, model, seed, steps, cfg, solver, scheduler, positive, negative, latent_image, teacher,
               teacher_positive, teacher_negative, teacher_cfg, lam, k, renoise, renoise_level, denoise,
               add_noise="enable", start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable"):
        add_noise = _enabled(add_noise, "add_noise")
        return_with_leftover_noise = _enabled(return_with_leftover_noise, "return_with_leftover_noise")
        sigmas = full_sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, scheduler=scheduler,
                                                       denoise=denoise, model_options=model.model_options).sigmas
        # KSamplerAdvanced's start/end slicing (comfy.samplers.KSampler.sample)
        if end_at_step < len(sigmas) - 1:
            sigmas = sigmas[:end_at_step + 1].clone()
            if not return_with_leftover_noise:
                sigmas[-1] = 0
        out = dict(latent_image)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        if start_at_step >= len(sigmas) - 1:
            out["samples"] = latent
            return (out,)
        sigmas = sigmas[start_at_step:]
        sampler = DistillationSampler(solver, teacher, teacher_positive, teacher_negative, teacher_cfg, lam, k, renoise,
                                      renoise_level, full_sigmas=full_sigmas, step_offset=start_at_step)
        if add_noise:
            noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        else:
            noise = torch.zeros(latent.size(), dtype=latent.dtype, layout=latent.layout, device="cpu")
        callback = latent_preview.prepare_callback(model, len(sigmas) - 1)
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
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DistillationPPSampler": "Distillation++ Sampler",
    "DistillationPPKSampler": "Distillation++ KSampler",
}
