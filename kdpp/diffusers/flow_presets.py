"""How the distilled flow students sample, and their teachers (plain data; no diffusers import).

Each student preset names its family (``"sd3"``, ``"flux"`` or ``"wan"``), its step count, its kdpp
sampler (``"euler"``: diffusers' ``FlowMatchEulerDiscreteScheduler`` step, which is deterministic
Euler; ``"lcm"``: its ``stochastic_sampling`` step, ``x0`` plus fresh noise), a copy of the
published ``FlowMatchEulerDiscreteScheduler`` config of its model repository (pass
``pipe.scheduler.config`` to ``generate`` to use the loaded one instead), how the schedule's base
sigmas are chosen (``schedule``: the family's pipeline's, or the distillation recipe's linear grid),
its own guidance (FLUX's distilled-guidance input for students with a guidance embedding; true CFG
scale) and its teacher. ``generate`` computes the schedule from the config as the family's pipeline
(or recipe) does.

**Distillation++ starting points, not tuned values.** ``lam = 0.1`` on the first step only
(``k = 1``, the paper's placement in all its quantitative results), random renoise noise, the teacher
renoised to the student's next noise level (the core's ``"auto"`` level: on a step to sigma 0, as the
one step of a one-step preset, its current level). No flow or video student was measured, by the
paper (it names them as future work) or here; the setting is the safest one measured on the distilled
digits students (docs/learned.md, "Which teacher call helps which student"): there ``lam = 0.5`` on the
first step is significantly worse for a capacity-limited student without CFG (+1.04 FD) and n.s. for
converged ones, while ``lam = 0.1`` costs at most +0.25 FD (0.4 %). Raise ``lam`` to 0.5 - 1 for a
student whose samples miss the prompt (on the digits: requested-class accuracy 0.63 -> 0.78 / 0.87),
and sweep it for your prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .presets import check_sampler, check_steps

#: ``scheduler/scheduler_config.json`` of stabilityai/stable-diffusion-3.5-large and -large-turbo
SD35_SCHEDULER = MappingProxyType({"num_train_timesteps": 1000, "shift": 3.0})
_FLUX_SHIFT = {"num_train_timesteps": 1000, "base_image_seq_len": 256, "max_image_seq_len": 4096,
               "base_shift": 0.5, "max_shift": 1.15}
#: black-forest-labs/FLUX.1-schnell: no shift
FLUX_SCHNELL_SCHEDULER = MappingProxyType({**_FLUX_SHIFT, "shift": 1.0, "use_dynamic_shifting": False})
#: black-forest-labs/FLUX.1-dev: resolution-dependent (dynamic) shift
FLUX_DEV_SCHEDULER = MappingProxyType({**_FLUX_SHIFT, "shift": 3.0, "use_dynamic_shifting": True})
#: the lightx2v Wan 2.1 T2V 4-step LoRA recipe (ModelTC/LightX2V configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json:
#: sample_shift 5, no CFG; its WanStepDistillScheduler steps x0 + fresh noise): the same step and shift in diffusers' scheduler
WAN_LIGHTX2V_SCHEDULER = MappingProxyType({"num_train_timesteps": 1000, "shift": 5.0, "use_dynamic_shifting": False,
                                           "stochastic_sampling": True})
SCHEDULES = ("pipeline", "linear")


@dataclass(frozen=True)
class FlowTeacherPreset:
    """A flow teacher: true CFG (``cfg_scale != 1``, SD3.5 Large) or distilled guidance (``guidance``, FLUX.1-dev)."""

    name: str
    family: str  #: "sd3", "flux" or "wan"
    cfg_scale: float = 1.0  #: true CFG, one batched [uncond, cond] call; 1 = the conditional model alone
    guidance: float | None = None  #: the guidance-embedding input (FLUX.1-dev); None for models without one
    notes: str = ""


#: SD3.5 Large with CFG 3.5, as its model card samples it (28 steps)
SD35_LARGE = FlowTeacherPreset("sd3.5-large", "sd3", cfg_scale=3.5,
                               notes="model card: 28 steps, guidance_scale 3.5 (diffusers' release post: 40 steps, 4.5)")
#: FLUX.1-dev with distilled guidance 3.5 (one forward per call), as its model card samples it (50 steps)
FLUX_DEV = FlowTeacherPreset("flux.1-dev", "flux", guidance=3.5, notes="model card: 50 steps, guidance_scale 3.5")
#: Wan 2.1 T2V with CFG 5.0, WanPipeline's default guidance_scale (and its example's)
WAN21_T2V = FlowTeacherPreset("wan2.1-t2v", "wan", cfg_scale=5.0, notes="WanPipeline: guidance_scale 5.0, 50 steps")


@dataclass(frozen=True)
class FlowStudentPreset:
    """How one distilled flow student samples, its teacher, and its Distillation++ starting point."""

    name: str
    family: str  #: "sd3", "flux" or "wan"
    steps: int
    scheduler_config: Mapping[str, Any]
    teacher: FlowTeacherPreset
    sampler: str = "euler"  #: a key of kdpp.SAMPLERS
    schedule: str = "pipeline"  #: "pipeline": the family pipeline's base sigmas; "linear": linspace(1, 1/N, N), then the shift
    cfg_scale: float = 1.0  #: the student's own true CFG (1: none)
    guidance: float | None = None  #: the student's guidance-embedding input (FLUX.1-dev LoRAs); None without one
    lam: float = 0.1
    k: int = 1
    renoise: str = "random"  #: the default renoising noise (see kdpp.TeacherRefinement)
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        check_sampler(self.sampler, "FlowStudentPreset.sampler")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"FlowStudentPreset.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.teacher, FlowTeacherPreset):
            raise TypeError(f"FlowStudentPreset.teacher must be a FlowTeacherPreset, got {type(self.teacher).__name__}")


def sd35_large_turbo(steps: int = 4) -> FlowStudentPreset:
    """SD3.5 Large Turbo (LADD-distilled SD3.5 Large): Euler, shift 3, no CFG; teacher SD3.5 Large with CFG 3.5."""
    steps = check_steps(steps, range(1, 9), "SD3.5 Large Turbo", "is meant for about 4 steps (1 to 8)")
    return FlowStudentPreset(f"sd3.5-large-turbo-{steps}step", "sd3", steps, SD35_SCHEDULER, SD35_LARGE,
                             notes="model card: 4 steps, guidance_scale 0.0 (no CFG)")


def flux_schnell(steps: int = 4) -> FlowStudentPreset:
    """FLUX.1-schnell: Euler, no shift, no guidance embedding; teacher FLUX.1-dev with guidance 3.5."""
    steps = check_steps(steps, range(1, 5), "FLUX.1-schnell", "is meant for 1 to 4 steps")
    return FlowStudentPreset(f"flux.1-schnell-{steps}step", "flux", steps, FLUX_SCHNELL_SCHEDULER, FLUX_DEV,
                             notes="model card: 4 steps, guidance_scale 0.0, max_sequence_length 256")


def flux_dev_lora(steps: int = 8, guidance: float = 3.5) -> FlowStudentPreset:
    """A step-distilled LoRA of FLUX.1-dev (Hyper-SD, FLUX.1-Turbo-Alpha style): FLUX.1-dev's dynamic shift and
    guidance embedding at few steps; the teacher is FLUX.1-dev itself (the base model without the LoRA)."""
    steps = check_steps(steps, range(1, 17), "step-distilled FLUX.1-dev LoRAs",
                        "come in 8 and 16 steps (1 to 16 allowed)")
    return FlowStudentPreset(f"flux.1-dev-lora-{steps}step", "flux", steps, FLUX_DEV_SCHEDULER, FLUX_DEV,
                             guidance=guidance,
                             notes="the LoRA on FLUX.1-dev's scheduler; guidance 3.5 as the base")


def wan21_lightx2v(steps: int = 4) -> FlowStudentPreset:
    """Wan 2.1 T2V with lightx2v's step-distilled LoRA: 4 steps of ``x0`` + fresh noise (kdpp's ``"lcm"``) at the
    flow times ``shift_5(1 - j/4)`` = 1, 0.9375, 0.8333, 0.625, no CFG; teacher: the base model (the LoRA off), CFG 5.

    The recipe of ModelTC/LightX2V (``configs/distill/wan21/wan_t2v_distill_lora_4step_cfg.json``: 4 steps,
    ``denoising_step_list`` [1000, 750, 500, 250], ``sample_shift`` 5, ``enable_cfg`` false; its
    ``WanStepDistillScheduler`` takes ``x0 = x - sigma v`` and renoises to the next sigma with fresh
    noise). The LoRA is distilled for 4 steps; other counts keep the linear grid.
    """
    steps = check_steps(steps, range(1, 9), "the lightx2v Wan 2.1 LoRA", "is distilled for 4 steps (1 to 8 allowed)")
    return FlowStudentPreset(f"wan2.1-lightx2v-{steps}step", "wan", steps, WAN_LIGHTX2V_SCHEDULER, WAN21_T2V,
                             sampler="lcm", schedule="linear",
                             notes="lightx2v: 4 steps, shift 5, guidance_scale 1 (no CFG), LCM-style stochastic step")


STUDENTS = {"sd3.5-large-turbo": sd35_large_turbo, "flux.1-schnell": flux_schnell, "flux.1-dev-lora": flux_dev_lora,
            "wan2.1-lightx2v": wan21_lightx2v}
"""Flow student families by name: each a function of the step count returning a :class:`FlowStudentPreset`."""
