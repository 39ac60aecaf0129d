"""``FluxPipeline`` with a Distillation++ teacher: FLUX.1-schnell (or a step-distilled FLUX.1-dev LoRA) guided by FLUX.1-dev."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from .. import sampling
from ..flow_models import FlowConditioning
from ..flow_presets import STUDENTS, FlowStudentPreset
from ..flux import FluxFamily, pack_latents, unpack_latents
from .base import WHY_IP, WHY_SCHEDULE, DistPPPipelineMixin, FlowLatentsMixin, flow_scheduler_config, flow_teacher

try:
    from diffusers import FluxPipeline
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput
except ImportError as error:  # pragma: no cover - the diffusers extra is missing
    raise ImportError("kdpp.diffusers.pipelines needs the diffusers extra: pip install 'kdpp[diffusers]'") from error


class FluxDistPPPipeline(FlowLatentsMixin, DistPPPipelineMixin, FluxPipeline):
    """``FluxPipeline`` whose denoising loop is Distillation++: the pipeline's transformer (the student) guided by a teacher.

    Build it with :meth:`from_pipe` ``(pipe, teacher=dev_pipe)`` (or ``teacher=dev_pipe.transformer``;
    for a step-distilled LoRA of FLUX.1-dev loaded in ``pipe``: ``teacher=SharedLoRAModel(pipe.transformer)``).
    The student preset defaults to ``"flux.1-schnell"``; ``"flux.1-dev-lora"`` is the LoRA students'.
    The teacher (``teacher_transformer``) is a pipeline component.
    """

    _family = FluxFamily
    _students = {name: make for name, make in STUDENTS.items() if make().family == "flux"}
    _default_student = "flux.1-schnell"
    _preset_type = FlowStudentPreset
    _latents_layout = "FluxPipeline's packed [B, (h/2)(w/2), 4C]"
    _model_class = "FluxTransformer2DModel"
    _family_label = "a FLUX"
    _optional_components = [*FluxPipeline._optional_components, "teacher_transformer"]

    def __init__(self, scheduler, vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, transformer,
                 image_encoder=None, feature_extractor=None, teacher_transformer=None):
        super().__init__(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
                         image_encoder=image_encoder, feature_extractor=feature_extractor)
        self.register_modules(teacher_transformer=teacher_transformer)
        self._init_distpp()

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None, negative_prompt_2: str | list[str] | None = None,
        true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
        num_inference_steps: int | None = None, sigmas: list[float] | None = None, guidance_scale: float | None = None,
        num_images_per_prompt: int = 1, generator: torch.Generator | list[torch.Generator] | None = None,
        latents: Tensor | None = None, prompt_embeds: Tensor | None = None, pooled_prompt_embeds: Tensor | None = None,
        ip_adapter_image: Any = None, ip_adapter_image_embeds: Any = None, negative_ip_adapter_image: Any = None,
        negative_ip_adapter_image_embeds: Any = None, negative_prompt_embeds: Tensor | None = None,
        negative_pooled_prompt_embeds: Tensor | None = None, output_type: str = "pil", return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' default, never mutated
        max_sequence_length: int = 512, *, lam: Any = None, k: int | None = None, guided_steps: list[int] | None = None,
        renoise: str | None = None, renoise_sigma: Any = None, teacher_guidance_scale: float | None = None,
        teacher_max_sequence_length: int = 512, teacher_joint_attention_kwargs: dict[str, Any] | None = None,
    ) -> FluxPipelineOutput | tuple:
        """Generate images as ``FluxPipeline.__call__`` does, with the teacher's guidance on the guided steps.

        The diffusers arguments are ``FluxPipeline``'s, with these defaults and limits:
        ``num_inference_steps`` defaults to the student preset's (schnell: 4); ``guidance_scale``
        is the distilled-guidance input of a student with a guidance embedding (FLUX.1-dev LoRAs;
        default the preset's 3.5) and, as in ``FluxPipeline``, has no effect on one without
        (schnell). ``sigmas`` and the IP-Adapter arguments are refused (the schedule is the
        preset's). ``latents`` are packed ``[B, (h/2)(w/2), 4C]`` as ``FluxPipeline`` takes and
        returns them; ``output_type="latent"`` returns them packed, in the transformer's dtype.

        kdpp's arguments: ``lam`` (the teacher guidance scale; default the preset's, 0: the plain
        student, no teacher call), ``k`` (guide the first ``k`` steps) or ``guided_steps``,
        ``renoise``, ``renoise_sigma`` (see :class:`kdpp.TeacherRefinement`),
        ``teacher_guidance_scale`` (FLUX.1-dev's guidance input; default 3.5),
        ``teacher_max_sequence_length`` (the teacher's T5 tokens, default 512; prompts are encoded
        again for it when it differs from ``max_sequence_length``, e.g. schnell's 256) and
        ``teacher_joint_attention_kwargs``.
        """
        guided_steps = self._begin(
            output_type, return_dict, num_inference_steps, guided_steps, sigmas=(sigmas, None, WHY_SCHEDULE),
            ip_adapter_image=(ip_adapter_image, None, WHY_IP), ip_adapter_image_embeds=(ip_adapter_image_embeds, None, WHY_IP),
            negative_ip_adapter_image=(negative_ip_adapter_image, None, WHY_IP),
            negative_ip_adapter_image_embeds=(negative_ip_adapter_image_embeds, None, WHY_IP))
        height, width = self._image_size(height, width, "FLUX")
        self.check_inputs(prompt, prompt_2, height, width, negative_prompt=negative_prompt,
                          negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
                          negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                          negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          max_sequence_length=max_sequence_length)
        preset = self.student_preset(num_inference_steps)
        if self.transformer.config.get("guidance_embeds") and guidance_scale is not None:
            preset = dataclasses.replace(preset, guidance=guidance_scale)
        self._guidance_scale = preset.guidance if guidance_scale is None else guidance_scale
        self._joint_attention_kwargs = joint_attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        has_negative = negative_prompt is not None or (negative_prompt_embeds is not None
                                                       and negative_pooled_prompt_embeds is not None)
        do_true_cfg = true_cfg_scale > 1 and has_negative
        if do_true_cfg:
            preset = dataclasses.replace(preset, cfg_scale=true_cfg_scale)
        teacher = flow_teacher(preset, teacher_guidance_scale)
        guided = self._guided(preset, lam, k, guided_steps)

        def encode(text, text_2, embeds, pooled, length):
            embeds, pooled, _ = self.encode_prompt(prompt=text, prompt_2=text_2, prompt_embeds=embeds,
                                                   pooled_prompt_embeds=pooled, device=device,
                                                   num_images_per_prompt=num_images_per_prompt,
                                                   max_sequence_length=length, lora_scale=lora_scale)
            return embeds, pooled

        embeds, pooled = encode(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds, max_sequence_length)
        negative = (encode(negative_prompt, negative_prompt_2, negative_prompt_embeds, negative_pooled_prompt_embeds,
                           max_sequence_length) if do_true_cfg else (None, None))
        conditioning = FlowConditioning(embeds, negative[0], pooled, negative[1])
        teacher_conditioning = None
        if guided and (teacher_max_sequence_length != max_sequence_length or teacher.cfg_scale != 1):
            if prompt_embeds is not None:
                raise ValueError("the teacher's embeddings differ from the student's (teacher_max_sequence_length or its "
                                 "true CFG), so the teacher needs the prompt strings: pass prompt, not prompt_embeds")
            t_embeds, t_pooled = encode(prompt, prompt_2, None, None, teacher_max_sequence_length)
            t_negative = (encode(negative_prompt or "", negative_prompt_2, None, None, teacher_max_sequence_length)
                          if teacher.cfg_scale != 1 else (None, None))
            teacher_conditioning = FlowConditioning(t_embeds, t_negative[0], t_pooled, t_negative[1])

        student, teacher_model = self._models()
        family = FluxFamily(student, teacher_model, conditioning, preset, teacher=teacher,
                            teacher_conditioning=teacher_conditioning,
                            scheduler_config=flow_scheduler_config(self, preset), height=height, width=width,
                            device=device, attention_kwargs=joint_attention_kwargs,
                            teacher_attention_kwargs=teacher_joint_attention_kwargs)
        batch = embeds.shape[0]
        self._check_latents(family, latents, batch, f"{height}x{width}")
        packed, _ = self.prepare_latents(batch, family.shape[0], height, width, embeds.dtype, device, generator, latents)
        x = self._sample(family, self._unpack(family, packed).float(), generator, lam=lam, k=k,
                         guided_steps=guided_steps, renoise=renoise, renoise_sigma=renoise_sigma,
                         callback_on_step_end=callback_on_step_end,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                         tensors={"prompt_embeds": embeds})
        x = x.to(self.transformer.dtype)
        if output_type == "latent":
            images = self._pack(family, x)
        else:
            images = self.image_processor.postprocess(sampling.vae_decode(self.vae, x), output_type=output_type)
        return self._finish(images, return_dict, lambda images: FluxPipelineOutput(images=images))

    def _pack(self, family: FluxFamily, latents: Tensor) -> Tensor:
        return pack_latents(latents)

    def _unpack(self, family: FluxFamily, latents: Tensor) -> Tensor:
        return unpack_latents(latents, *family.shape[1:])

