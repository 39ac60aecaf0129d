"""Moved to :mod:`kdpp.diffusers.presets`; this module keeps the old import path working."""
from .diffusers.presets import (
    STUDENTS,
    StudentPreset,
    TeacherPreset,
    dmd2,
    lcm,
    lcm_timesteps,
    lightning,
    sdxl_teacher,
    turbo,
)

__all__ = ["STUDENTS", "StudentPreset", "TeacherPreset", "dmd2", "lcm", "lcm_timesteps", "lightning", "sdxl_teacher",
           "turbo"]
