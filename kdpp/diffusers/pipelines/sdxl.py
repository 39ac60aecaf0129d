"""``StableDiffusionXLPipeline`` with a Distillation++ teacher: distilled SDXL students guided by SDXL base (CFG)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
from torch import Tensor

from .. import sampling
from ..presets import STUDENTS, StudentPreset, sdxl_teacher
from ..sdxl import SDXLConditioning, SDXLFamily
from .base import WHY_IP, WHY_SCHEDULE, DistPPPipelineMixin

try:
    from diffusers import StableDiffusionXLPipeline
    from diffusers.pipelines.stable_diffusion_xl.pipeline_output import StableDiffusionXLPipelineOutput
except ImportError as error:  # pragma: no cover - the diffusers extra is missing
    raise ImportError("kdpp.diffusers.pipelines needs the diffusers extra: pip install 'kdpp[diffusers]'") from error


class StableDiffusionXLDistPPPipeline(DistPPPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` whose denoising loop is Distillation++: the pipeline's UNet (a distilled student)
    guided by a teacher (SDXL base with CFG).

    Build it with :meth:`from_pipe` ``(student_pipe, teacher=base_pipe, student="sdxl-lightning")`` (the
    student is one of :data:`kdpp.diffusers.presets.STUDENTS`: ``"sdxl-lightning"``, ``"sdxl-turbo"``,
    ``"dmd2"``, ``"lcm"``, ``"lcm-lora"``, ``"sdxl-lightning-lora"``, or a preset); LoRA students
    loaded into SDXL base: ``teacher=SharedLoRAModel(pipe.unet)``. The teacher (``teacher_unet``) is a
    pipeline component. The preset's sampler replaces the pipeline's scheduler; its training schedule
    (``scheduler.alphas_cumprod``) is the pipeline's.
    """

    _family = SDXLFamily
    _denoiser = "unet"
    _teacher_component = "teacher_unet"
    _students = STUDENTS
    _preset_type = StudentPreset
    _model_class = "UNet2DConditionModel"  #: with addition_embed_type="text_time" (:meth:`_of_family`)
    _family_label = "an SDXL"
    _generator_in_step = True  # StableDiffusionXLPipeline passes generator to scheduler.step (prepare_extra_step_kwargs)
    _optional_components = [*StableDiffusionXLPipeline._optional_components, "teacher_unet"]

    def __init__(self, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, unet, scheduler, image_encoder=None,
                 feature_extractor=None, force_zeros_for_empty_prompt: bool = True, add_watermarker: bool | None = None,
                 teacher_unet=None):
        super().__init__(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                         tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, image_encoder=image_encoder,
                         feature_extractor=feature_extractor, force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
                         add_watermarker=add_watermarker)
        self.register_modules(teacher_unet=teacher_unet)
        self._init_distpp()

    @classmethod
    def _of_family(cls, model: Any) -> bool:
        """A ``UNet2DConditionModel`` with SDXL's pooled-text and size conditioning (``addition_embed_type="text_time"``)."""
        config = getattr(getattr(model, "_orig_mod", model), "config", None)
        return super()._of_family(model) and getattr(config, "addition_embed_type", None) == "text_time"

    @staticmethod
    def _preset_steps(preset: StudentPreset) -> int:
        return len(preset.timesteps)

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None, height: int | None = None,
        width: int | None = None, num_inference_steps: int | None = None, timesteps: list[int] | None = None,
        sigmas: list[float] | None = None, denoising_end: float | None = None, guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1, eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
        ip_adapter_image: Any = None, ip_adapter_image_embeds: Any = None, output_type: str = "pil",
        return_dict: bool = True, cross_attention_kwargs: dict[str, Any] | None = None, guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None, crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None, negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0), negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None, callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' default, never mutated
        *, lam: Any = None, k: int | None = None, guided_steps: list[int] | None = None, renoise: str | None = None,
        renoise_sigma: Any = None, teacher_guidance_scale: float | None = None, guidance_space: str | None = None,
        teacher_cross_attention_kwargs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> StableDiffusionXLPipelineOutput | tuple:
        """Generate images as ``StableDiffusionXLPipeline.__call__`` does, with the teacher's guidance on the guided steps.

        The diffusers arguments are ``StableDiffusionXLPipeline``'s, with these defaults and limits:
        ``num_inference_steps`` defaults to the student preset's; ``guidance_scale`` is the
        guidance-embedding input of a student UNet with ``time_cond_proj_dim`` (LCM; default 5.0,
        the pipeline's) and must be at most 1 (no CFG, as distilled SDXL students sample) for the
        others. The micro-conditioning (``original_size``, ``crops_coords_top_left``,
        ``target_size``) reaches the student and the teacher's conditional half, the ``negative_*``
        one the teacher's unconditional half (where both negative sizes are given, as the pipeline
        takes them). Refused: ``timesteps``, ``sigmas``, ``denoising_end`` (the schedule is the
        preset's), ``eta``, ``guidance_rescale`` (no student CFG), the IP-Adapter arguments and
        the deprecated ``callback`` / ``callback_steps``.

        kdpp's arguments: ``lam``, ``k`` / ``guided_steps``, ``renoise``, ``renoise_sigma`` (see
        :class:`kdpp.TeacherRefinement`), ``teacher_guidance_scale`` (SDXL base's CFG; default 7.5,
        6.0 with DPM++ 2S ancestral; its negative embeddings are ``negative_prompt``'s),
        ``guidance_space`` (``"x0"`` or ``"epsilon"``, default the preset's) and
        ``teacher_cross_attention_kwargs``.
        """
        name = type(self).__name__
        for old in kwargs:
            if old in ("callback", "callback_steps"):
                raise ValueError(f"{name} does not support {old} (deprecated in diffusers): use callback_on_step_end")
            raise TypeError(f"{name}.__call__() got an unexpected keyword argument {old!r}")
        guided_steps = self._begin(
            output_type, return_dict, num_inference_steps, guided_steps, timesteps=(timesteps, None, WHY_SCHEDULE),
            sigmas=(sigmas, None, WHY_SCHEDULE), denoising_end=(denoising_end, None, WHY_SCHEDULE),
            eta=(eta, 0.0, "the preset's sampler has no eta (the DDIM scheduler's)"),
            ip_adapter_image=(ip_adapter_image, None, WHY_IP), ip_adapter_image_embeds=(ip_adapter_image_embeds, None, WHY_IP),
            guidance_rescale=(guidance_rescale, 0.0, "it rescales the student's CFG, which distilled students sample without"))
        height, width = self._image_size(height, width, "SDXL")
        self.check_inputs(prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
                          negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, None, None,
                          callback_on_step_end_tensor_inputs)
        preset = self.student_preset(num_inference_steps)
        embedding = self.unet.config.get("time_cond_proj_dim") is not None
        if not embedding and guidance_scale is not None and guidance_scale > 1:
            raise ValueError(f"guidance_scale={guidance_scale} would sample the student with CFG, which kdpp's SDXL family "
                             "does not do (distilled SDXL students sample without CFG): pass guidance_scale=0 (or leave "
                             "it out); the teacher's CFG is teacher_guidance_scale")
        self._guidance_scale = guidance_scale if guidance_scale is not None else (5.0 if embedding else 0.0)
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = None
        self._interrupt = False
        device = self._execution_device
        teacher = sdxl_teacher(preset.sampler)
        if teacher_guidance_scale is not None:
            teacher = dataclasses.replace(teacher, cfg_scale=teacher_guidance_scale)
        conditioning = SDXLConditioning(*self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=True, negative_prompt=negative_prompt, negative_prompt_2=negative_prompt_2,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            lora_scale=(cross_attention_kwargs or {}).get("scale"), clip_skip=clip_skip))

        projection = (int(conditioning.pooled_prompt_embeds.shape[-1]) if self.text_encoder_2 is None
                      else self.text_encoder_2.config.projection_dim)
        add_time_ids = self._get_add_time_ids(tuple(original_size or (height, width)), tuple(crops_coords_top_left),
                                              tuple(target_size or (height, width)), dtype=torch.float32,
                                              text_encoder_projection_dim=projection)
        negative_add_time_ids = add_time_ids
        if negative_original_size is not None and negative_target_size is not None:  # the pipeline's rule
            negative_add_time_ids = self._get_add_time_ids(
                tuple(negative_original_size), tuple(negative_crops_coords_top_left), tuple(negative_target_size),
                dtype=torch.float32, text_encoder_projection_dim=projection)

        student, teacher_model = self._models()
        family = SDXLFamily(student, teacher_model, conditioning, preset, teacher=teacher, height=height, width=width,
                            add_time_ids=add_time_ids, negative_add_time_ids=negative_add_time_ids,
                            guidance_space=guidance_space, alphas_cumprod=self.scheduler.alphas_cumprod,
                            student_guidance=guidance_scale if embedding else None, device=device,
                            attention_kwargs=cross_attention_kwargs,
                            teacher_attention_kwargs=teacher_cross_attention_kwargs)
        self._check_latents(family, latents, conditioning.batch, f"{height}x{width}")
        start = self.prepare_latents(conditioning.batch, family.shape[0], height, width,
                                     conditioning.prompt_embeds.dtype, device, generator, latents)
        start = start.float() / float(self.scheduler.init_noise_sigma)  # the unit noise; the preset scales it
        x = self._sample(family, start, generator, lam=lam, k=k, guided_steps=guided_steps, renoise=renoise,
                         renoise_sigma=renoise_sigma, callback_on_step_end=callback_on_step_end,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                         tensors={"prompt_embeds": conditioning.prompt_embeds,
                                  "add_text_embeds": conditioning.pooled_prompt_embeds, "add_time_ids": family.time_ids})
        x = x.to(self.unet.dtype)
        if output_type == "latent":
            images = x
        else:
            images = sampling.vae_decode(self.vae, x)
            if self.watermark is not None:
                images = self.watermark.apply_watermark(images)
            images = self.image_processor.postprocess(images, output_type=output_type)
        return self._finish(images, return_dict, lambda images: StableDiffusionXLPipelineOutput(images=images))

    def _noise_dtype(self, family: SDXLFamily) -> torch.dtype:
        return self.unet.dtype  # the schedulers draw their step noise in the model output's dtype

    def _frame(self, family: SDXLFamily, x: Tensor, sigma: float) -> Tensor:
        """Euler-type schedulers (``"ve"`` presets) hold ``x`` itself; LCMScheduler (``"vp"``) ``x / sqrt(1 + sigma^2)``."""
        return x / math.sqrt(1 + sigma**2) if family.preset.noise_scale == "vp" else x

    def _unframe(self, family: SDXLFamily, latents: Tensor, sigma: float) -> Tensor:
        return latents * math.sqrt(1 + sigma**2) if family.preset.noise_scale == "vp" else latents

    def _timestep(self, family: SDXLFamily, i: int) -> Tensor:
        return torch.tensor(float(family.preset.timesteps[i]), device=family.device)
