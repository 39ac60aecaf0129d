"""kdpp: Distillation++ samplers in k-diffusion's conventions.

A fast distilled *student* and a slow pre-trained *teacher*, both VE denoisers
``D(x, sigma, **extra) -> x0``; the teacher corrects the student's denoised
estimate on the guided steps, by default the first (Park et al., "Inference-Time Diffusion
Model Distillation"). ``import kdpp`` imports neither k-diffusion nor diffusers.
"""
from . import schedules
from ._checks import KdppWarning
from .cfg import CFGDenoiser
from .noise import initial_noise, seeded_noise_sampler
from .refine import Refined, TeacherRefinement
from .solvers import (
    SAMPLERS,
    sample_dpmpp_2m_cfg_pp_guided_history_distpp,
    sample_dpmpp_2m_distpp,
    sample_dpmpp_2s_ancestral_cfg_pp_per_stage_distpp,
    sample_dpmpp_2s_ancestral_distpp,
    sample_euler_ancestral_cfg_pp_distpp,
    sample_euler_ancestral_distpp,
    sample_euler_cfg_pp_distpp,
    sample_euler_distpp,
    sample_lcm_distpp,
)
from .solvers._run import ancestral_step

__version__ = "0.1.0"

__all__ = [
    "CFGDenoiser",
    "KdppWarning",
    "Refined",
    "SAMPLERS",
    "TeacherRefinement",
    "schedules",
    "ancestral_step",
    "sample_dpmpp_2m_cfg_pp_guided_history_distpp",
    "sample_dpmpp_2m_distpp",
    "sample_dpmpp_2s_ancestral_cfg_pp_per_stage_distpp",
    "sample_dpmpp_2s_ancestral_distpp",
    "sample_euler_ancestral_cfg_pp_distpp",
    "sample_euler_ancestral_distpp",
    "sample_euler_cfg_pp_distpp",
    "sample_euler_distpp",
    "initial_noise",
    "sample_lcm_distpp",
    "seeded_noise_sampler",
]
