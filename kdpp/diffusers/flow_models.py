"""Flow-matching transformers (SD3, FLUX, Wan) as VE denoisers: what the flow families share.

A family adapter (:class:`kdpp.diffusers.sd3.SD3Velocity`, :class:`kdpp.diffusers.flux.FluxVelocity`,
:class:`kdpp.diffusers.wan.WanVelocity`) turns a diffusers transformer into a rectified-flow velocity
model ``v(x_rf, t, **conditioning)``, doing what its pipeline does around the transformer call
(timestep scale, latent packing, position ids, guidance embedding); :class:`kdpp.flow.FlowDenoiser`
makes that a VE denoiser. :meth:`FlowTransformer.schedule` drives diffusers'
``FlowMatchEulerDiscreteScheduler`` the way the family's pipeline does (static shift,
resolution-dependent dynamic shift). :class:`FlowFamily` is the flow families' side of the one
generation body (:func:`kdpp.diffusers.sampling.sample`), which SDXL's family shares.

The sampler state is kept in float32 whatever the transformers' dtype (the start at ``t = 1`` is
``x_ve = 2^30 eps``, see :mod:`kdpp.flow`); each adapter casts its inputs to its transformer's
dtype, so a bfloat16 run calls the models with the same timesteps as a float32 run.
"""
from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from ..cfg import CFGDenoiser
from ..flow import FlowDenoiser, flow_sigmas, initial_noise_scale
from . import sampling
from .flow_presets import FlowStudentPreset, FlowTeacherPreset
from .sampling import (Denoisers, Family, ModelCall, check_attention_kwargs, check_embeddings, check_type, check_vae,
                       model_device)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """The dynamic-shift ``mu``: linear in the image token count, ``base_shift`` at ``base_seq_len``, ``max_shift`` at ``max_seq_len``."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


@dataclass
class FlowConditioning:
    """Text conditioning for a batch, in the order ``StableDiffusion3Pipeline.encode_prompt`` returns it.

    SD3: ``FlowConditioning(*pipe.encode_prompt(...))`` holds ``(prompt_embeds,
    negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)`` (``[B, 333,
    4096]`` token embeddings, ``[B, 2048]`` pooled ones). FLUX: ``FluxPipeline.encode_prompt``
    returns ``(prompt_embeds, pooled_prompt_embeds, text_ids)`` (``[B, 512, 4096]`` T5, ``[B, 768]``
    CLIP, zero text ids): build it with :meth:`from_flux` ``(*pipe.encode_prompt(...))`` or by
    keyword. The negative embeddings are needed only where true CFG is used (the SD3.5 Large
    teacher) and the teacher is called; their token count may differ from the prompt's (as
    ``FluxPipeline`` takes them: CFG is then two calls instead of one batched call). Shapes are
    checked on construction.
    """

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None  #: required; a default only to keep encode_prompt's order
    negative_pooled_prompt_embeds: Tensor | None = None

    def __post_init__(self):
        check_embeddings(self, "in StableDiffusion3Pipeline.encode_prompt's order: prompt_embeds, negative_prompt_embeds, "
                               "pooled_prompt_embeds, negative_pooled_prompt_embeds; FLUX: FlowConditioning.from_flux("
                               "*FluxPipeline.encode_prompt(...)) or keywords", negatives_optional=True,
                         tokens_may_differ=True)

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]

    @classmethod
    def from_flux(cls, prompt_embeds: Tensor, pooled_prompt_embeds: Tensor,
                  text_ids: Tensor | None = None) -> "FlowConditioning":
        """From ``FluxPipeline.encode_prompt``'s ``(prompt_embeds, pooled_prompt_embeds, text_ids)``.

        FLUX's text ids are zeros (the adapter builds them); other ones are refused.
        """
        if text_ids is not None and (not isinstance(text_ids, Tensor) or text_ids.shape[-1] != 3 or bool(text_ids.any())):
            raise ValueError("text_ids must be FluxPipeline.encode_prompt's zero [tokens, 3] ids (kdpp builds them), "
                             f"got {text_ids!r:.80}")
        return cls(prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds)

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def kwargs(self, negative: bool = False, *, device: Any = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The transformer's ``encoder_hidden_states`` and ``pooled_projections`` (the negative ones with ``negative``)."""
        emb, pooled = ((self.negative_prompt_embeds, self.negative_pooled_prompt_embeds) if negative
                       else (self.prompt_embeds, self.pooled_prompt_embeds))
        if emb is None:
            raise ValueError("true CFG needs negative_prompt_embeds and negative_pooled_prompt_embeds in the conditioning")
        return {"encoder_hidden_states": emb.to(device=device, dtype=dtype),
                "pooled_projections": pooled.to(device=device, dtype=dtype)}

    def check_batch(self, batch: int, name: str) -> None:
        if self.batch != batch:
            raise ValueError(f"{name}.prompt_embeds has batch {self.batch}, seeds has {batch}")


class FlowTransformer(ABC):
    """A diffusers flow-matching transformer as a rectified-flow velocity model ``v(x_rf, t, **kwargs)``.

    A family subclass sets ``family``, ``config_key`` (a config entry only its transformers
    have), ``attention_key`` (the transformer's attention-kwargs argument), the latent geometry
    and :meth:`forward`. ``t`` is the flow time in ``[0, 1]``; the transformer's ``timestep`` is
    ``t * timestep_scale``. ``guidance`` is the distilled-guidance input of transformers with a
    guidance embedding (``config.guidance_embeds``, FLUX.1-dev), and must be ``None`` for the
    others. Inputs are cast to the transformer's dtype; the velocity comes back in the dtype of
    ``x_rf``. The transformer is called through :attr:`call` (the transformer itself, or a
    :class:`kdpp.diffusers.sampling.ModelCall` around it: :meth:`calling`).
    """

    family = ""
    config_key = ""
    pipeline = ""  #: the diffusers pipeline this adapter follows, for error messages
    attention_key = "joint_attention_kwargs"
    timestep_scale = 1.0

    def __init__(self, transformer: Any, name: str = "transformer", guidance: float | None = None):
        config = getattr(transformer, "config", None)
        if config is None or self.config_key not in config:
            raise ValueError(f"{name} is not a {self.pipeline} transformer: its config has no {self.config_key!r} "
                             f"(got {type(transformer).__name__}); student and teacher must share the latent "
                             "space and its packing")
        embeds = bool(config.get("guidance_embeds", False))
        if embeds and guidance is None:
            raise ValueError(f"{name} has a guidance embedding (guidance_embeds, as FLUX.1-dev): its preset must set guidance")
        if not embeds and guidance is not None:
            raise ValueError(f"{name} has no guidance embedding, but its preset sets guidance={guidance}")
        self.transformer, self.config, self.name, self.guidance = transformer, config, name, guidance
        self.call: Callable[..., Any] = transformer
        self.dtype = getattr(transformer, "dtype", torch.float32)

    def calling(self, call: Callable[..., Any]) -> "FlowTransformer":
        """A copy of this adapter that calls ``call`` (e.g. a :class:`kdpp.diffusers.sampling.ModelCall`) for the transformer."""
        adapter = copy.copy(self)
        adapter.call = call
        return adapter

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the (unpacked) VAE latent the sampler runs on."""

    @abstractmethod
    def latent_shape(self, *size: int) -> tuple[int, ...]:
        """One item's latent shape for an output of ``size`` (pixels; frames for video); refuses sizes the model cannot take."""

    @abstractmethod
    def image_seq_len(self, shape: Sequence[int]) -> int:
        """The transformer's token count for one latent of ``shape`` (what the dynamic shift depends on)."""

    def default_sigmas(self, steps: int, scheduler_config: Mapping[str, Any]) -> Sequence[float] | None:
        """The ``sigmas`` the pipeline passes to ``set_timesteps`` (``None``: the scheduler's own)."""
        return None

    @abstractmethod
    def forward(self, x_rf: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The transformer's velocity at ``x_rf`` (in its dtype) and its ``timestep``, with the conditioning ``kwargs``."""

    def check_conditioning(self, conditioning: Any, name: str) -> None:
        """Refuse embeddings of other widths than the transformer's ``joint_attention_dim`` / ``pooled_projection_dim``."""
        for key, field in (("joint_attention_dim", "prompt_embeds"), ("pooled_projection_dim", "pooled_prompt_embeds")):
            width = self.config.get(key)
            got = getattr(conditioning, field).shape[-1]
            if isinstance(width, int) and got != width:
                raise ValueError(f"{name}.{field} has width {got}, {self.name} takes {width} (its config.{key}): "
                                 "the embeddings must come from this model's text encoders")

    def check_latents(self, x: Tensor, ndim: int = 4, layout: str = "[B, {c}, h, w]") -> None:
        """Refuse latents that are not ``layout`` (``ndim`` dimensions, ``latent_channels`` channels)."""
        if x.ndim != ndim or x.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name} takes latents {layout.format(c=self.latent_channels)} (its in_channels "
                             f"{self.config['in_channels']}), got shape {tuple(x.shape)}")

    def schedule(self, scheduler_config: Mapping[str, Any], steps: int, shape: Sequence[int],
                 base: str = "pipeline") -> Tensor:
        """The flow times ``t_0 = 1 > ... > t_N = 0`` (float32) diffusers' ``FlowMatchEulerDiscreteScheduler``
        sets for ``steps`` steps on a latent of ``shape``.

        ``base="pipeline"``: the ``sigmas`` the family's pipeline passes to ``set_timesteps``
        (:meth:`default_sigmas`); ``"linear"``: ``linspace(1, 1/N, N)`` before the shift (the
        lightx2v step-distillation recipe's ``denoising_step_list``). The scheduler's shift (static,
        or dynamic over :meth:`image_seq_len` tokens) applies to both.
        """
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        config = scheduler.config
        mu = None
        if config.get("use_dynamic_shifting"):
            mu = calculate_shift(self.image_seq_len(shape), config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / steps, steps) if base == "linear" else self.default_sigmas(steps, config)
        scheduler.set_timesteps(steps, sigmas=sigmas, mu=mu)
        return scheduler.sigmas.cpu()

    def __call__(self, x_rf: Tensor, t: Tensor, **kwargs) -> Tensor:
        self.check_latents(x_rf)
        out = self.forward(x_rf.to(self.dtype), t * self.timestep_scale if self.timestep_scale != 1 else t, kwargs)
        return out.to(x_rf.dtype)


class SeparateCFGDenoiser(CFGDenoiser):
    """:class:`kdpp.CFGDenoiser` from two calls, conditional then unconditional, as ``WanPipeline`` and
    ``FluxPipeline`` run their CFG: for conditionings that cannot be batched (token counts that differ)."""

    def _both(self, x: Tensor, sigma: Tensor, cond: Any, uncond: Any, kwargs: dict) -> tuple[Tensor, Tensor]:
        cond_out = self.model(x, sigma, **self._kwargs(cond, "cond"), **kwargs)
        uncond_out = self.model(x, sigma, **self._kwargs(uncond, "uncond"), **kwargs)
        return uncond_out + self.scale * (cond_out - uncond_out), uncond_out


def flow_denoiser(adapter: FlowTransformer, conditioning: Any, cfg_scale: float, device: Any,
                  name: str = "conditioning") -> tuple[Callable, dict]:
    """``adapter`` as a VE denoiser with its keyword arguments: plain, or true CFG in one batched call
    (two calls, :class:`SeparateCFGDenoiser`, where the negative embeddings' token count is not the prompt's).

    True CFG needs the negative embeddings; errors name the conditioning (``name``) that lacks them.
    """
    denoiser = FlowDenoiser(adapter)
    cond = conditioning.kwargs(device=device, dtype=adapter.dtype)
    if cfg_scale == 1:
        return denoiser, cond
    if not conditioning.has_negative:
        raise ValueError(f"{name} has no negative prompt embeddings, but {adapter.name} is sampled with true CFG "
                         f"(cfg_scale {cfg_scale}): pass encode_prompt's negative embeddings "
                         "(do_classifier_free_guidance=True)")
    uncond = conditioning.kwargs(negative=True, device=device, dtype=adapter.dtype)
    batched = all(cond[key].shape[1:] == uncond[key].shape[1:] for key in cond)
    return (CFGDenoiser if batched else SeparateCFGDenoiser)(denoiser, cfg_scale), {"cond": cond, "uncond": uncond}


class FlowFamily(Family):
    """A flow family's student and teacher transformers bound to a batch's conditioning and output size.

    Args:
        student_transformer: the student's diffusers transformer.
        teacher_transformer: the teacher's (the same latent space: channels and packing are checked);
            ``None`` for runs that never call it (``lam=0``, ``k=0``).
        conditioning: the batch's text embeddings (the family's conditioning class).
        preset: the student's :class:`kdpp.diffusers.flow_presets.FlowStudentPreset` (steps,
            scheduler config, sampler, its own guidance, Distillation++ defaults); default: the family's.
        teacher: the :class:`kdpp.diffusers.flow_presets.FlowTeacherPreset` (default: the preset's).
        teacher_conditioning: the teacher's embeddings when they differ (FLUX.1-schnell is run with
            256 T5 tokens, FLUX.1-dev with 512); default ``conditioning``.
        scheduler_config: the student's ``FlowMatchEulerDiscreteScheduler`` config (e.g.
            ``pipe.scheduler.config``); default: the preset's copy of the published one.
        height: image height in pixels (a multiple of what the family's packing needs).
        width: image width in pixels, the same.
        device: where to sample (default: the student's device).
        attention_kwargs: the student transformer's attention keyword arguments on every call (SD3,
            FLUX: ``joint_attention_kwargs``; Wan: ``attention_kwargs``; e.g. ``{"scale": 0.8}``);
            ``teacher_attention_kwargs`` the teacher's.
    """

    velocity: type[FlowTransformer]
    conditioning_type: type = FlowConditioning
    default_preset: Callable[[], FlowStudentPreset]
    teacher_arg = "teacher_transformer"

    def __init__(
        self, student_transformer: Any, teacher_transformer: Any, conditioning: Any,
        preset: FlowStudentPreset | None = None, *, teacher: FlowTeacherPreset | None = None,
        teacher_conditioning: Any = None, scheduler_config: Mapping[str, Any] | None = None, height: int = 1024,
        width: int = 1024, device: torch.device | str | None = None, attention_kwargs: dict[str, Any] | None = None,
        teacher_attention_kwargs: dict[str, Any] | None = None,
    ):
        self.height, self.width = height, width
        preset = type(self).default_preset() if preset is None else preset
        check_type(conditioning, self.conditioning_type, "conditioning")
        check_type(preset, FlowStudentPreset, "preset")
        teacher = preset.teacher if teacher is None else teacher
        check_type(teacher, FlowTeacherPreset, "teacher")
        teacher_conditioning = conditioning if teacher_conditioning is None else teacher_conditioning
        check_type(teacher_conditioning, self.conditioning_type, "teacher_conditioning")
        family = self.velocity.family
        if preset.family != family:
            raise ValueError(f"preset {preset.name!r} is a {preset.family!r} preset, this family samples {family!r}")
        if teacher.family != family:
            raise ValueError(f"teacher preset {teacher.name!r} is a {teacher.family!r} preset, not {family!r}")
        scheduler_config = preset.scheduler_config if scheduler_config is None else scheduler_config
        if scheduler_config.get("stochastic_sampling") and preset.sampler != "lcm":
            raise ValueError(f"scheduler_config sets stochastic_sampling (an x0 + fresh noise step: kdpp's 'lcm' sampler), "
                             f"but preset {preset.name!r} samples with {preset.sampler!r}")
        train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
        self.student_adapter = self.velocity(student_transformer, "student_transformer", preset.guidance, train_steps)
        self.student_adapter.check_conditioning(conditioning, "conditioning")
        self.teacher_adapter = None
        if teacher_transformer is not None:
            self.teacher_adapter = self.velocity(teacher_transformer, "teacher_transformer", teacher.guidance, train_steps)
            if self.student_adapter.latent_channels != self.teacher_adapter.latent_channels:
                raise ValueError(f"student and teacher latent spaces differ: student_transformer takes "
                                 f"{self.student_adapter.latent_channels} latent channels, teacher_transformer "
                                 f"{self.teacher_adapter.latent_channels}; Distillation++ needs a shared latent space")
            self.teacher_adapter.check_conditioning(teacher_conditioning, "teacher_conditioning")
        self.shape = self.latent_shape(self.student_adapter)
        self.student_model, self.teacher_model = student_transformer, teacher_transformer
        self.conditioning, self.teacher_conditioning = conditioning, teacher_conditioning
        self.preset, self.teacher = preset, teacher
        self.attention_kwargs = check_attention_kwargs(attention_kwargs, "attention_kwargs")
        self.teacher_attention_kwargs = check_attention_kwargs(teacher_attention_kwargs, "teacher_attention_kwargs")
        self.ts = self.student_adapter.schedule(scheduler_config, preset.steps, self.shape, preset.schedule)
        self.sigmas, self.noise_scale = flow_sigmas(self.ts), initial_noise_scale(self.ts)
        self.dtype = torch.float32
        self.device = model_device(student_transformer) if device is None else torch.device(device)

    def latent_shape(self, adapter: FlowTransformer) -> tuple[int, ...]:
        """One item's latent shape for this family's output size (image families: ``height``, ``width``)."""
        return adapter.latent_shape(self.height, self.width)

    def check_batch(self, batch: int) -> None:
        self.conditioning.check_batch(batch, "conditioning")
        self.teacher_conditioning.check_batch(batch, "teacher_conditioning")

    def denoisers(self, lam: Any, guided: bool) -> Denoisers:
        key = self.student_adapter.attention_key
        student, extra_args = flow_denoiser(
            self.student_adapter.calling(ModelCall(self.student_model, sampling.STUDENT_CONTEXT, key,
                                                   self.attention_kwargs)),
            self.conditioning, self.preset.cfg_scale, self.device)
        teacher, teacher_extra_args = None, {}
        if guided:
            teacher, teacher_extra_args = flow_denoiser(
                self.teacher_adapter.calling(ModelCall(self.teacher_model, sampling.TEACHER_CONTEXT, key,
                                                       self.teacher_attention_kwargs)),
                self.teacher_conditioning, self.teacher.cfg_scale, self.device, "teacher_conditioning")
        return Denoisers(student, teacher, extra_args, teacher_extra_args, lam)

    def check_vae(self, vae: Any) -> None:
        check_vae(vae, self.shape[0], "the transformers take")

    def decode(self, vae: Any, latents: Tensor) -> list:
        return sampling.decode(vae, latents)
