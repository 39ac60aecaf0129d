"""``WanPipeline`` with a Distillation++ teacher: Wan 2.1 T2V with a step-distilled LoRA guided by its base model (CFG)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

from .. import sampling
from ..flow_presets import STUDENTS, FlowStudentPreset
from ..wan import WanConditioning, WanFamily
from .base import DistPPPipelineMixin, FlowLatentsMixin, flow_scheduler_config, flow_teacher

try:
    from diffusers import WanPipeline
    from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
except ImportError as error:  # pragma: no cover - the diffusers extra is missing
    raise ImportError("kdpp.diffusers.pipelines needs the diffusers extra: pip install 'kdpp[diffusers]'") from error

_WHY_TWO = "Wan 2.2's second expert (transformer_2, boundary_ratio) is not a kdpp student or teacher"


class WanDistPPPipeline(FlowLatentsMixin, DistPPPipelineMixin, WanPipeline):
    """``WanPipeline`` (Wan 2.1 T2V) whose denoising loop is Distillation++: the pipeline's transformer with a
    step-distilled LoRA (the student, lightx2v's 4-step recipe by default) guided by the same transformer with the
    LoRA off and CFG 5 (the teacher).

    Build it with :meth:`from_pipe` ``(pipe, teacher=SharedLoRAModel(pipe.transformer))`` after loading the
    LoRA into ``pipe`` (one transformer in memory), or with a separate teacher (``teacher=base_pipe``, a
    pipeline component ``teacher_transformer``). The preset's stochastic Euler step replaces the
    pipeline's scheduler where that is not a ``FlowMatchEulerDiscreteScheduler`` (``WanPipeline`` loads
    ``UniPCMultistepScheduler``).
    """

    _family = WanFamily
    _students = {name: make for name, make in STUDENTS.items() if make().family == "wan"}
    _default_student = "wan2.1-lightx2v"
    _preset_type = FlowStudentPreset
    _latents_layout = "[B, C, F, h, w]"
    _per_prompt = "num_videos_per_prompt"
    _model_class = "WanTransformer3DModel"
    _family_label = "a Wan"
    _optional_components = [*WanPipeline._optional_components, "teacher_transformer"]

    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 boundary_ratio: float | None = None, expand_timesteps: bool = False, teacher_transformer=None):
        super().__init__(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                         transformer=transformer, transformer_2=transformer_2, boundary_ratio=boundary_ratio,
                         expand_timesteps=expand_timesteps)
        self.register_modules(teacher_transformer=teacher_transformer)
        self._init_distpp()

    @torch.no_grad()
    def __call__(
        self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None, height: int = 480,
        width: int = 832, num_frames: int = 81, num_inference_steps: int | None = None,
        guidance_scale: float | None = None, guidance_scale_2: float | None = None, num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None, latents: Tensor | None = None,
        prompt_embeds: Tensor | None = None, negative_prompt_embeds: Tensor | None = None, output_type: str = "np",
        return_dict: bool = True, attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 - diffusers' default, never mutated
        max_sequence_length: int = 512, *, lam: Any = None, k: int | None = None, guided_steps: list[int] | None = None,
        renoise: str | None = None, renoise_sigma: Any = None, teacher_guidance_scale: float | None = None,
        teacher_attention_kwargs: dict[str, Any] | None = None,
    ) -> WanPipelineOutput | tuple:
        """Generate videos as ``WanPipeline.__call__`` does, with the teacher's guidance on the guided steps.

        The diffusers arguments are ``WanPipeline``'s, with these defaults and limits:
        ``num_inference_steps`` defaults to the student preset's (lightx2v: 4); ``guidance_scale``
        is the student's CFG (``> 1``: CFG with ``negative_prompt``, as the pipeline does), default
        the preset's (lightx2v: none); ``num_frames`` must be ``4 n + 1`` (the pipeline rounds other
        counts; kdpp refuses them) and ``height`` / ``width`` multiples of 16 (the pipeline's own
        ``check_inputs`` refuses other sizes); ``prompt_embeds`` may have another token count than
        ``negative_prompt_embeds`` (CFG then runs two passes, as the pipeline does); Wan 2.2's
        ``guidance_scale_2`` (and a pipeline with ``transformer_2`` / ``boundary_ratio`` /
        ``expand_timesteps``) is refused. ``WanPipeline`` does not pass ``generator`` to its
        scheduler's step, so a stochastic step's noise comes from torch's global RNG, here as there.

        kdpp's arguments: ``lam``, ``k`` / ``guided_steps``, ``renoise``, ``renoise_sigma`` (see
        :class:`kdpp.TeacherRefinement`), ``teacher_guidance_scale`` (the teacher's CFG, default 5.0,
        ``WanPipeline``'s; its negative embeddings are ``negative_prompt``'s) and ``teacher_attention_kwargs``.
        """
        guided_steps = self._begin(
            output_type, return_dict, num_inference_steps, guided_steps,
            guidance_scale_2=(guidance_scale_2, None, _WHY_TWO), transformer_2=(self.transformer_2, None, _WHY_TWO),
            boundary_ratio=(self.config.boundary_ratio, None, _WHY_TWO),
            expand_timesteps=(self.config.expand_timesteps, False, "Wan 2.2 TI2V's per-token timesteps are not built by "
                              "kdpp's Wan family"))
        self.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs, guidance_scale_2)
        preset = self.student_preset(num_inference_steps)
        if guidance_scale is not None:
            preset = dataclasses.replace(preset, cfg_scale=guidance_scale if guidance_scale > 1 else 1.0)
        self._guidance_scale = preset.cfg_scale
        self._guidance_scale_2 = None
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        teacher = flow_teacher(preset, teacher_guidance_scale)
        guided = self._guided(preset, lam, k, guided_steps)
        embeds, negative = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt,
            do_classifier_free_guidance=preset.cfg_scale != 1 or (guided and teacher.cfg_scale != 1),
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, max_sequence_length=max_sequence_length, device=device)
        dtype = self.transformer.dtype
        conditioning = WanConditioning(embeds.to(dtype), None if negative is None else negative.to(dtype))

        student, teacher_model = self._models()
        family = WanFamily(student, teacher_model, conditioning, preset, teacher=teacher,
                           scheduler_config=flow_scheduler_config(self, preset), height=height, width=width,
                           num_frames=num_frames, device=device, attention_kwargs=attention_kwargs,
                           teacher_attention_kwargs=teacher_attention_kwargs)
        if self.vae is not None:
            family.check_vae(self.vae)
        self._check_latents(family, latents, conditioning.batch, f"{num_frames} frames of {height}x{width}")
        start = self.prepare_latents(conditioning.batch, family.shape[0], height, width, num_frames, torch.float32,
                                     device, generator, latents)
        x = self._sample(family, start.float(), generator, lam=lam, k=k, guided_steps=guided_steps, renoise=renoise,
                         renoise_sigma=renoise_sigma, callback_on_step_end=callback_on_step_end,
                         callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                         tensors={"prompt_embeds": conditioning.prompt_embeds,
                                  "negative_prompt_embeds": conditioning.negative_prompt_embeds})
        x = x.to(dtype)
        videos = (x if output_type == "latent"
                  else self.video_processor.postprocess_video(sampling.vae_decode(self.vae, x), output_type=output_type))
        return self._finish(videos, return_dict, lambda videos: WanPipelineOutput(frames=videos))
