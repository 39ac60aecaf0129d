"""The schedules and samplers SDXL students are meant to run with, and the teacher's.

Each preset is plain data (no diffusers import): the VP timesteps, the kdpp sampler, the
prediction type, LCM's boundary condition, and Distillation++ defaults. ``sigmas()`` gives the
VE schedule for the SD/SDXL ``scaled_linear`` training schedule (or any ``alphas_cumprod``);
``initial_noise_scale()`` the VE scale of the starting noise, as the family's reference scheduler
sets it: ``"vp"`` families (LCM, DMD2) feed the UNet pure unit noise ``x_vp = eps`` at the first
timestep, which in VE is ``eps * sqrt(1 + sigma_0^2)``, not ``eps * sigma_0`` (they differ by 32%
at DMD2's one-step t = 399); ``"ve"`` families (Lightning, Turbo: diffusers' Euler schedulers with
trailing spacing) start from ``eps * sigma_0``.

Guidance defaults are the authors' (``geonyeong-park/distillation_pp_lightning``,
``latent_sdxl.py``): ``lam = 0.1`` mixed in x0 space for the Euler-family students (Lightning,
Turbo), ``lam = 0.01`` mixed in epsilon space for the consistency students (LCM, DMD2), with
``k = 1`` guided step as in the paper's tables (their code defaults to 2 and 3 guided steps).
A guided step to sigma 0 (the one step of one-step students, the last step of any schedule) is
renoised at its own level by the core's default level (``renoise_sigma="auto"``), so it calls the
teacher; no preset special-cases it.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Collection

from torch import Tensor

from ..schedules import timestep_sigmas, trailing_timesteps
from ..solvers import SAMPLERS

GUIDANCE_SPACES = ("x0", "epsilon")


@dataclass(frozen=True)
class StudentPreset:
    """How one distilled student family samples, and its Distillation++ defaults."""

    name: str
    sampler: str  #: a key of kdpp.SAMPLERS
    timesteps: tuple[int, ...]
    prediction: str = "epsilon"
    lcm_boundary: bool = False
    lam: float = 0.1
    k: int = 1
    guidance_space: str = "x0"  #: "x0": R = D + lam (T - D); "epsilon": the authors' eps mix (EpsilonSpaceGuidance)
    renoise: str = "random"  #: the default renoising noise (see kdpp.TeacherRefinement)
    resolution: int = 1024  #: the image size the family was trained at (a recommendation; time_ids use (h, w))
    noise_scale: str = "ve"  #: "ve": start at sigma_0 * eps; "vp": at sqrt(1 + sigma_0^2) * eps
    notes: str = ""

    def __post_init__(self):
        check_sampler(self.sampler, "StudentPreset.sampler")
        if self.guidance_space not in GUIDANCE_SPACES:
            raise ValueError(f"guidance_space must be one of {GUIDANCE_SPACES}, got {self.guidance_space!r}")

    def sigmas(self, alphas_cumprod: Tensor | None = None) -> Tensor:
        """The VE schedule: the sigmas of ``timesteps``, then 0 (float64)."""
        return timestep_sigmas(list(self.timesteps), alphas_cumprod)

    def initial_noise_scale(self, alphas_cumprod: Tensor | None = None) -> float:
        """Multiply unit Gaussian noise by this to start sampling: ``sigma_0`` or ``sqrt(1 + sigma_0^2)``."""
        sigma_0 = float(self.sigmas(alphas_cumprod)[0])
        return math.sqrt(1 + sigma_0**2) if self.noise_scale == "vp" else sigma_0


def check_sampler(sampler: str, name: str) -> None:
    """``ValueError`` naming ``name`` unless ``sampler`` is a key of :data:`kdpp.SAMPLERS`."""
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"{name} must be one of kdpp.SAMPLERS {sorted(SAMPLERS)}, got {sampler!r}")


def check_steps(steps: int, allowed: Collection[int], family: str, what: str) -> int:
    """``steps`` as an int if ``allowed`` holds it, else a ``ValueError`` naming the count."""
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(f"steps must be an int, got {steps!r}")
    if int(steps) not in allowed:
        raise ValueError(f"{family} {what}, got steps={steps}")
    return int(steps)


def lightning(steps: int = 4) -> StudentPreset:
    """SDXL-Lightning (and its LoRA): Euler, trailing timesteps; the 1-step UNet predicts x0."""
    steps = check_steps(steps, (1, 2, 4, 8), "SDXL-Lightning", "comes in 1, 2, 4 and 8 steps")
    return StudentPreset(f"sdxl-lightning-{steps}step", "euler", tuple(trailing_timesteps(steps)),
                         prediction="sample" if steps == 1 else "epsilon",
                         notes="EulerDiscreteScheduler(timestep_spacing='trailing'); no CFG")


def turbo(steps: int = 4) -> StudentPreset:
    """SDXL-Turbo: Euler ancestral at trailing timesteps, trained at 512 px (the paper used DPM++ 2S a)."""
    steps = check_steps(steps, range(1, 5), "SDXL-Turbo", "is meant for 1 to 4 steps")
    return StudentPreset(f"sdxl-turbo-{steps}step", "euler_ancestral", tuple(trailing_timesteps(steps)),
                         resolution=512,
                         notes="EulerAncestralDiscreteScheduler(timestep_spacing='trailing'); no CFG")


def dmd2(steps: int = 4) -> StudentPreset:
    """DMD2: multistep consistency at t = 999, 749, 499, 249 (4 steps) or one step at t = 399."""
    steps = check_steps(steps, (1, 4), "DMD2 SDXL", "comes in 1 and 4 steps")
    timesteps = (399,) if steps == 1 else tuple(trailing_timesteps(4))
    return StudentPreset(f"dmd2-{steps}step", "lcm", timesteps, noise_scale="vp", lam=0.01, guidance_space="epsilon",
                         notes="LCMScheduler-style denoise / renoise; no CFG")


def lcm_timesteps(steps: int, original_inference_steps: int = 50, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """LCMScheduler's timesteps: ``steps`` picks evenly (floor) from its 50-step origin schedule."""
    steps = check_steps(steps, range(1, original_inference_steps + 1), "LCM",
                         f"samples 1 to original_inference_steps = {original_inference_steps} steps")
    c = num_train_timesteps // original_inference_steps
    origin = [i * c - 1 for i in range(1, original_inference_steps + 1)][::-1]
    return tuple(origin[math.floor(j * original_inference_steps / steps)] for j in range(steps))


def lcm(steps: int = 4) -> StudentPreset:
    """LCM / LCM-LoRA: multistep consistency at LCMScheduler's timesteps (1 to 50) with its boundary condition."""
    timesteps = lcm_timesteps(steps)
    return StudentPreset(f"lcm-{len(timesteps)}step", "lcm", timesteps, lcm_boundary=True, noise_scale="vp", lam=0.01,
                         guidance_space="epsilon",
                         notes="boundary condition timestep_scaling 10, sigma_data 0.5; guidance embedding for LCM")


def lcm_lora(steps: int = 4) -> StudentPreset:
    """LCM-LoRA (SDXL): :func:`lcm`'s schedule and boundary condition, no CFG, no guidance embedding.

    The student is SDXL base plus the LoRA, so the teacher is the same UNet with the adapter
    off: :mod:`kdpp.diffusers.lora` samples the pair from one model.
    """
    return replace(lcm(steps), name=f"lcm-lora-{steps}step",
                   notes="LoRA of SDXL base (kdpp.diffusers.lora: one UNet); LCMScheduler boundary condition; no CFG")


def lightning_lora(steps: int = 4) -> StudentPreset:
    """SDXL-Lightning LoRA (2, 4 or 8 steps; the 1-step model is a full UNet): :func:`lightning`'s Euler schedule.

    The student is SDXL base plus the LoRA, so the teacher is the same UNet with the adapter
    off: :mod:`kdpp.diffusers.lora` samples the pair from one model.
    """
    steps = check_steps(steps, (2, 4, 8), "SDXL-Lightning LoRA", "comes in 2, 4 and 8 steps")
    return replace(lightning(steps), name=f"sdxl-lightning-lora-{steps}step",
                   notes="LoRA of SDXL base (kdpp.diffusers.lora: one UNet); EulerDiscreteScheduler(timestep_spacing='trailing')")


@dataclass(frozen=True)
class TeacherPreset:
    """The teacher: SDXL base with classifier-free guidance."""

    name: str = "sdxl-base"
    cfg_scale: float = 7.5  #: the paper's scale (6.0 with DPM++ 2S ancestral)
    prediction: str = "epsilon"


def sdxl_teacher(sampler: str = "euler") -> TeacherPreset:
    """SDXL base with CFG 7.5, or 6.0 when the student samples with DPM++ 2S ancestral (the paper's choices)."""
    check_sampler(sampler, "sampler")
    return TeacherPreset(cfg_scale=6.0 if sampler.startswith("dpmpp_2s_ancestral") else 7.5)


STUDENTS = {
    "sdxl-lightning": lightning, "sdxl-turbo": turbo, "dmd2": dmd2, "lcm": lcm, "lcm-lora": lcm_lora,
    "sdxl-lightning-lora": lightning_lora,
}
"""Student families by name: each a function of the step count returning a :class:`StudentPreset`."""
