"""diffusers pipelines with a Distillation++ teacher: prompt strings in, diffusers' own outputs out.

Each pipeline is the family's diffusers pipeline (a subclass: ``FluxPipeline``,
``StableDiffusion3Pipeline``, ``StableDiffusionXLPipeline``, ``WanPipeline``) built with
``from_pipe(pipe, teacher=...)`` from the user's own pipeline, sharing its components, plus a teacher:

- :class:`~kdpp.diffusers.pipelines.flux.FluxDistPPPipeline`: FLUX.1-schnell (or a step-distilled
  FLUX.1-dev LoRA) guided by FLUX.1-dev;
- :class:`~kdpp.diffusers.pipelines.sd3.StableDiffusion3DistPPPipeline`: SD3.5 Large Turbo guided by SD3.5 Large;
- :class:`~kdpp.diffusers.pipelines.sdxl.StableDiffusionXLDistPPPipeline`: distilled SDXL students
  (Lightning, Turbo, DMD2, LCM and their LoRAs) guided by SDXL base;
- :class:`~kdpp.diffusers.pipelines.wan.WanDistPPPipeline`: Wan 2.1 T2V with a step-distilled LoRA
  guided by its own base model.

``__call__`` takes the diffusers pipeline's arguments and kdpp's (``lam``, ``k`` /
``guided_steps``, ``renoise``, ``renoise_sigma``, ``teacher_guidance_scale``) and returns the
pipeline's own output class. The sampling itself is the one generation body,
:func:`kdpp.diffusers.sampling.sample`; :mod:`kdpp.diffusers.pipelines.base` holds what the four share.
Importing this package imports diffusers.
"""
from .flux import FluxDistPPPipeline
from .sd3 import StableDiffusion3DistPPPipeline
from .sdxl import StableDiffusionXLDistPPPipeline
from .wan import WanDistPPPipeline

__all__ = ["FluxDistPPPipeline", "StableDiffusion3DistPPPipeline", "StableDiffusionXLDistPPPipeline",
           "WanDistPPPipeline"]
