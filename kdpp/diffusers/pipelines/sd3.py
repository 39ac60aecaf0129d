"""``StableDiffusion3Pipeline`` with a Distillation++ teacher: SD3.5 Large Turbo guided by SD3.5 Large (true CFG)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from .. import sampling
from ..flow_models import FlowConditioning
from ..flow_presets import STUDENTS, FlowStudentPreset
from ..sd3 import SD3Family
from .base import WHY_IP, WHY_SCHEDULE, DistPPPipelineMixin, FlowLatentsMixin, flow_scheduler_config, flow_teacher

try:
    from diffusers import StableDiffusion3Pipeline
    from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput
except ImportError as error:  # pragma: no cover - the diffusers extra is missing
    raise ImportError("kdpp.diffusers.pipelines needs the diffusers extra: pip install 'kdpp[diffusers]'") from error

_WHY_SLG = ("skip-layer guidance is not built by kdpp's SD3 family (the student's CFG and the teacher's CFG are "
            "plain true CFG); leave skip_guidance_layers out")


class StableDiffusion3DistPPPipeline(FlowLatentsMixin, DistPPPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` whose denoising loop is Distillation++: the pipeline's transformer (the student,
    SD3.5 Large Turbo by default) guided by a teacher (SD3.5 Large with true CFG 3.5).

    Build it with :meth:`from_pipe` ``(turbo_pipe, teacher=large_pipe)`` (or ``teacher=large_pipe.transformer``).
    The teacher (``teacher_transformer``) is a pipeline component; it shares the student's text encoders.
    """

    _family = SD3Family
    _students = {name: make for name, make in STUDENTS.items() if make().family == "sd3"}
    _default_student = "sd3.5-large-turbo"
    _preset_type = FlowStudentPreset
    _model_class = "SD3Transformer2DModel"
    _family_label = "an SD3"
    _optional_components = [*StableDiffusion3Pipeline._optional_components, "teacher_transformer"]

    def __init__(self, transformer, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 text_encoder_3, tokenizer_3, image_encoder=None, feature_extractor=None, teacher_transformer=None):
        super().__init__(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                         tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                         text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, image_encoder=image_encoder,
                         feature_extractor=feature_extractor)
        self.register_modules(teacher_transformer=teacher_transformer)
        self._init_distpp()

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None, height: int | None = None, width: int | None = None,
        num_inference_steps: int | None = None, sigmas: list[float] | None = None, guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None, num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None,
        pooled_prompt_embeds: Tensor | None = None, negative_pooled_prompt_embeds: Tensor | None = None,
        ip_adapter_image: Any = None, ip_adapter_image_embeds: Any = None, output_type: str = "pil",
        return_dict: bool = True, joint_attention_kwargs: dict[str, Any] | None = None, clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' default, never mutated
        max_sequence_length: int = 256, skip_guidance_layers: list[int] | None = None,
        skip_layer_guidance_scale: float = 2.8, skip_layer_guidance_stop: float = 0.2,
        skip_layer_guidance_start: float = 0.01, mu: float | None = None, *, lam: Any = None, k: int | None = None,
        guided_steps: list[int] | None = None, renoise: str | None = None, renoise_sigma: Any = None,
        teacher_guidance_scale: float | None = None, teacher_joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> StableDiffusion3PipelineOutput | tuple:
        """Generate images as ``StableDiffusion3Pipeline.__call__`` does, with the teacher's guidance on the guided steps.

        The diffusers arguments are ``StableDiffusion3Pipeline``'s, with these defaults and limits:
        ``num_inference_steps`` defaults to the student preset's (SD3.5 Large Turbo: 4);
        ``guidance_scale`` is the student's true CFG (``> 1``: CFG with ``negative_prompt``, as the
        pipeline does), default the preset's (Turbo: none); ``sigmas``, ``mu`` (the schedule is the
        preset's), the IP-Adapter arguments and ``skip_guidance_layers`` are refused (the
        ``skip_layer_guidance_*`` settings act only with it, as in the pipeline).

        kdpp's arguments: ``lam``, ``k`` / ``guided_steps``, ``renoise``, ``renoise_sigma`` (see
        :class:`kdpp.TeacherRefinement`), ``teacher_guidance_scale`` (the teacher's true CFG,
        default 3.5; its negative embeddings are ``negative_prompt``'s) and
        ``teacher_joint_attention_kwargs``.
        """
        guided_steps = self._begin(
            output_type, return_dict, num_inference_steps, guided_steps, sigmas=(sigmas, None, WHY_SCHEDULE),
            mu=(mu, None, WHY_SCHEDULE), ip_adapter_image=(ip_adapter_image, None, WHY_IP),
            ip_adapter_image_embeds=(ip_adapter_image_embeds, None, WHY_IP),
            skip_guidance_layers=(skip_guidance_layers, None, _WHY_SLG))
        height, width = self._image_size(height, width, "SD3")
        self.check_inputs(prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        preset = self.student_preset(num_inference_steps)
        if guidance_scale is not None:
            preset = dataclasses.replace(preset, cfg_scale=guidance_scale if guidance_scale > 1 else 1.0)
        self._guidance_scale = preset.cfg_scale
        self._skip_layer_guidance_scale = skip_layer_guidance_scale
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        teacher = flow_teacher(preset, teacher_guidance_scale)
        guided = self._guided(preset, lam, k, guided_steps)
        embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=preset.cfg_scale != 1 or (guided and teacher.cfg_scale != 1),
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=pooled_prompt_embeds, negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            device=device, clip_skip=clip_skip, num_images_per_prompt=num_images_per_prompt,
            max_sequence_length=max_sequence_length, lora_scale=(joint_attention_kwargs or {}).get("scale"))
        conditioning = FlowConditioning(*embeds)

        student, teacher_model = self._models()
        family = SD3Family(student, teacher_model, conditioning, preset, teacher=teacher,
                           scheduler_config=flow_scheduler_config(self, preset), height=height, width=width,
                           device=device, attention_kwargs=joint_attention_kwargs,
                           teacher_attention_kwargs=teacher_joint_attention_kwargs)
        self._check_latents(family, latents, conditioning.batch, f"{height}x{width}")
        start = self.prepare_latents(conditioning.batch, family.shape[0], height, width, conditioning.prompt_embeds.dtype,
                                     device, generator, latents)
        x = self._sample(family, start.float(), generator, lam=lam, k=k, guided_steps=guided_steps, renoise=renoise,
                         renoise_sigma=renoise_sigma, callback_on_step_end=callback_on_step_end,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                         tensors={"prompt_embeds": conditioning.prompt_embeds,
                                  "pooled_prompt_embeds": conditioning.pooled_prompt_embeds})
        x = x.to(self.transformer.dtype)
        images = (x if output_type == "latent"
                  else self.image_processor.postprocess(sampling.vae_decode(self.vae, x), output_type=output_type))
        return self._finish(images, return_dict, lambda images: StableDiffusion3PipelineOutput(images=images))
