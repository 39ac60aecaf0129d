"""The schedules and samplers SDXL students are meant to run with, and the teacher's.

Each preset is plain data (no diffusers import): the VP timesteps, the kdpp sampler, the
prediction type, LCM's boundary condition, and Distillation++ defaults. ``sigmas()`` gives the
VE schedule for the SD/SDXL ``scaled_linear`` training schedule (or any ``alphas_cumprod``);
``initial_noise_scale()`` the VE scale of the starting noise, as the family's reference scheduler
sets it: ``"vp"`` families (LCM, DMD2) feed the UNet pure unit noise ``x_vp = eps`` at the first
timestep, which in VE is ``eps * sqrt(1 + sigma_0^2)``, not ``eps * sigma_0`` (they differ by 32%
at DMD2's one-step t = 399); ``"ve"`` families (Lightning, Turbo: diffusers' Euler schedulers with
trailing spacing) start from ``eps * sigma_0``.

The paper's lam values per family were lost in its extracted text; the ``lam`` defaults here
(0.5, with ``k = 1`` as in all the paper's quantitative results) are starting points to sweep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ..schedules import timestep_sigmas, trailing_timesteps


@dataclass(frozen=True)
class StudentPreset:
    """How one distilled student family samples, and its Distillation++ defaults."""

    name: str
    sampler: str  #: a key of kdpp.SAMPLERS
    timesteps: tuple[int, ...]
    prediction: str = "epsilon"
    lcm_boundary: bool = False
    lam: float = 0.5
    k: int = 1
    resolution: int = 1024  #: the size its SDXL time_ids describe
    noise_scale: str = "ve"  #: "ve": start at sigma_0 * eps; "vp": at sqrt(1 + sigma_0^2) * eps
    notes: str = ""

    def sigmas(self, alphas_cumprod: Tensor | None = None) -> Tensor:
        """The VE schedule: the sigmas of ``timesteps``, then 0 (float64)."""
        return timestep_sigmas(list(self.timesteps), alphas_cumprod)

    def initial_noise_scale(self, alphas_cumprod: Tensor | None = None) -> float:
        """Multiply unit Gaussian noise by this to start sampling: ``sigma_0`` or ``sqrt(1 + sigma_0^2)``."""
        sigma_0 = float(self.sigmas(alphas_cumprod)[0])
        return math.sqrt(1 + sigma_0**2) if self.noise_scale == "vp" else sigma_0


def lightning(steps: int = 4) -> StudentPreset:
    """SDXL-Lightning (and its LoRA): Euler, trailing timesteps; the 1-step UNet predicts x0."""
    if steps not in (1, 2, 4, 8):
        raise ValueError(f"SDXL-Lightning comes in 1, 2, 4 and 8 steps, got {steps}")
    return StudentPreset(f"sdxl-lightning-{steps}step", "euler", tuple(trailing_timesteps(steps)),
                         prediction="sample" if steps == 1 else "epsilon",
                         notes="EulerDiscreteScheduler(timestep_spacing='trailing'); no CFG")


def turbo(steps: int = 4) -> StudentPreset:
    """SDXL-Turbo: Euler ancestral at trailing timesteps, 512 px time_ids (the paper used DPM++ 2S a)."""
    if not 1 <= steps <= 4:
        raise ValueError(f"SDXL-Turbo is meant for 1 to 4 steps, got {steps}")
    return StudentPreset(f"sdxl-turbo-{steps}step", "euler_ancestral", tuple(trailing_timesteps(steps)),
                         resolution=512, notes="EulerAncestralDiscreteScheduler(timestep_spacing='trailing'); no CFG")


def dmd2(steps: int = 4) -> StudentPreset:
    """DMD2: multistep consistency at t = 999, 749, 499, 249 (4 steps) or one step at t = 399."""
    if steps not in (1, 4):
        raise ValueError(f"DMD2 SDXL comes in 1 and 4 steps, got {steps}")
    timesteps = (399,) if steps == 1 else tuple(trailing_timesteps(4))
    return StudentPreset(f"dmd2-{steps}step", "lcm", timesteps, noise_scale="vp", notes="LCMScheduler-style denoise / renoise; no CFG")


def lcm_timesteps(steps: int, original_inference_steps: int = 50, num_train_timesteps: int = 1000) -> tuple[int, ...]:
    """LCMScheduler's timesteps: ``steps`` picks evenly (floor) from its 50-step origin schedule."""
    c = num_train_timesteps // original_inference_steps
    origin = [i * c - 1 for i in range(1, original_inference_steps + 1)][::-1]
    return tuple(origin[math.floor(j * original_inference_steps / steps)] for j in range(steps))


def lcm(steps: int = 4) -> StudentPreset:
    """LCM / LCM-LoRA: multistep consistency at LCMScheduler's timesteps with its boundary condition."""
    return StudentPreset(f"lcm-{steps}step", "lcm", lcm_timesteps(steps), lcm_boundary=True, noise_scale="vp",
                         notes="boundary condition timestep_scaling 10, sigma_data 0.5; guidance embedding for LCM")


@dataclass(frozen=True)
class TeacherPreset:
    """The teacher: SDXL base with classifier-free guidance."""

    name: str = "sdxl-base"
    cfg_scale: float = 7.5  #: the paper's scale (6.0 with DPM++ 2S ancestral)
    prediction: str = "epsilon"


def sdxl_teacher(sampler: str = "euler") -> TeacherPreset:
    """SDXL base with CFG 7.5, or 6.0 when the student samples with DPM++ 2S ancestral (the paper's choices)."""
    return TeacherPreset(cfg_scale=6.0 if sampler.startswith("dpmpp_2s_ancestral") else 7.5)


STUDENTS = {
    "sdxl-lightning": lightning, "sdxl-turbo": turbo, "dmd2": dmd2, "lcm": lcm, "lcm-lora": lcm,
}
"""Student families by name: each a function of the step count returning a :class:`StudentPreset`."""
