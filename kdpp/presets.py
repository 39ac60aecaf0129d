"""Moved to :mod:`kdpp.diffusers.presets`; this module keeps the old import path working."""
from .diffusers.presets import (
    STUDENTS,
    StudentPreset,
    TeacherPreset,
    dmd2,
    lcm,
    lcm_lora,
    lcm_timesteps,
    lightning,
    lightning_lora,
    sdxl_teacher,
    turbo,
)

__all__ = ["STUDENTS", "StudentPreset", "TeacherPreset", "dmd2", "lcm", "lcm_lora", "lcm_timesteps", "lightning",
           "lightning_lora", "sdxl_teacher", "turbo"]
