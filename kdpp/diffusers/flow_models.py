"""Flow-matching transformers (SD3, FLUX) as VE denoisers: what the two families share.

A family adapter (:class:`kdpp.diffusers.sd3.SD3Velocity`, :class:`kdpp.diffusers.flux.FluxVelocity`)
turns a diffusers transformer into a rectified-flow velocity model ``v(x_rf, t, **conditioning)``,
doing what its pipeline does around the transformer call (timestep scale, latent packing, position
ids, guidance embedding); :class:`kdpp.flow.FlowDenoiser` makes that a VE denoiser.
:meth:`FlowTransformer.schedule` drives diffusers' ``FlowMatchEulerDiscreteScheduler`` the way the
family's pipeline does (static shift, resolution-dependent dynamic shift); :func:`generate_flow` is
the ``generate`` both families share, through :func:`kdpp.diffusers.sampling.sample_batch` (the
batch sampler SDXL's ``generate`` uses too).

The sampler state is kept in float32 whatever the transformers' dtype (the start at ``t = 1`` is
``x_ve = 2^24 eps``, see :mod:`kdpp.flow`); each adapter casts its inputs to its transformer's
dtype, so a bfloat16 run calls the models with the same timesteps as a float32 run.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..cfg import CFGDenoiser
from ..flow import FlowDenoiser, flow_sigmas, initial_noise_scale
from ..refine import RenoiseSigma
from .flow_presets import FlowStudentPreset, FlowTeacherPreset
from .sampling import (calls_teacher, check_embeddings, check_image_size, check_seeds, check_type, check_vae, decode,
                       model_device, sample_batch)


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
    teacher) and the teacher is called. Shapes are checked on construction.
    """

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None
    pooled_prompt_embeds: Tensor | None = None  #: required; a default only to keep encode_prompt's order
    negative_pooled_prompt_embeds: Tensor | None = None

    def __post_init__(self):
        check_embeddings(self, "in StableDiffusion3Pipeline.encode_prompt's order: prompt_embeds, negative_prompt_embeds, "
                               "pooled_prompt_embeds, negative_pooled_prompt_embeds; FLUX: FlowConditioning.from_flux("
                               "*FluxPipeline.encode_prompt(...)) or keywords", negatives_optional=True)

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
        for field in ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds"):
            value = getattr(self, field)
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"{name}.{field} has batch {value.shape[0]}, seeds has {batch}")


class FlowTransformer(ABC):
    """A diffusers flow-matching transformer as a rectified-flow velocity model ``v(x_rf, t, **kwargs)``.

    A family subclass sets ``family``, ``config_key`` (a config entry only its transformers
    have), the latent geometry and :meth:`forward`. ``t`` is the flow time in ``[0, 1]``; the
    transformer's ``timestep`` is ``t * timestep_scale``. ``guidance`` is the distilled-guidance
    input of transformers with a guidance embedding (``config.guidance_embeds``, FLUX.1-dev), and
    must be ``None`` for the others. Inputs are cast to the transformer's dtype; the velocity
    comes back in the dtype of ``x_rf``.
    """

    family = ""
    config_key = ""
    pipeline = ""  #: the diffusers pipeline this adapter follows, for error messages
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
        self.dtype = getattr(transformer, "dtype", torch.float32)

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the (unpacked) VAE latent the sampler runs on."""

    @abstractmethod
    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """``(channels, h, w)`` of the latent of a ``height x width`` image; refuses sizes the model cannot take."""

    @abstractmethod
    def image_seq_len(self, h: int, w: int) -> int:
        """The image token count of an ``h x w`` latent (what the dynamic shift depends on)."""

    def default_sigmas(self, steps: int, scheduler_config: Mapping[str, Any]) -> Sequence[float] | None:
        """The ``sigmas`` the pipeline passes to ``set_timesteps`` (``None``: the scheduler's own)."""
        return None

    @abstractmethod
    def forward(self, x_rf: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        """The transformer's velocity at ``x_rf`` (in its dtype) and its ``timestep``, with the conditioning ``kwargs``."""

    def check_conditioning(self, conditioning: FlowConditioning, name: str) -> None:
        """Refuse embeddings of other widths than the transformer's ``joint_attention_dim`` / ``pooled_projection_dim``."""
        for key, field in (("joint_attention_dim", "prompt_embeds"), ("pooled_projection_dim", "pooled_prompt_embeds")):
            width = self.config.get(key)
            got = getattr(conditioning, field).shape[-1]
            if isinstance(width, int) and got != width:
                raise ValueError(f"{name}.{field} has width {got}, {self.name} takes {width} (its config.{key}): "
                                 "the embeddings must come from this model's text encoders")

    def check_latents(self, x: Tensor) -> None:
        """Refuse latents that are not ``[B, latent_channels, h, w]`` with a size the model can take."""
        if x.ndim != 4 or x.shape[1] != self.latent_channels:
            raise ValueError(f"{self.name} takes latents [B, {self.latent_channels}, h, w] (its in_channels "
                             f"{self.config['in_channels']}), got shape {tuple(x.shape)}")

    def schedule(self, scheduler_config: Mapping[str, Any], steps: int, h: int, w: int) -> Tensor:
        """The flow times ``t_0 = 1 > ... > t_N = 0`` (float32) diffusers' ``FlowMatchEulerDiscreteScheduler``
        sets when the family's pipeline samples an ``h x w`` latent in ``steps`` steps."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config))
        config = scheduler.config
        mu = None
        if config.get("use_dynamic_shifting"):
            mu = calculate_shift(self.image_seq_len(h, w), config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15))
        scheduler.set_timesteps(steps, sigmas=self.default_sigmas(steps, config), mu=mu)
        return scheduler.sigmas.cpu()

    def __call__(self, x_rf: Tensor, t: Tensor, **kwargs) -> Tensor:
        self.check_latents(x_rf)
        out = self.forward(x_rf.to(self.dtype), t * self.timestep_scale if self.timestep_scale != 1 else t, kwargs)
        return out.to(x_rf.dtype)


def flow_denoiser(adapter: FlowTransformer, conditioning: FlowConditioning, cfg_scale: float, device: Any,
                  name: str = "conditioning") -> tuple[Callable, dict]:
    """``adapter`` as a VE denoiser with its keyword arguments: plain, or true CFG in one batched call.

    True CFG needs the negative embeddings; errors name the conditioning (``name``) that lacks them.
    """
    denoiser = FlowDenoiser(adapter)
    cond = conditioning.kwargs(device=device, dtype=adapter.dtype)
    if cfg_scale == 1:
        return denoiser, cond
    if not conditioning.has_negative:
        raise ValueError(f"{name} has no negative_prompt_embeds / negative_pooled_prompt_embeds, but {adapter.name} is "
                         f"sampled with true CFG (cfg_scale {cfg_scale}): pass encode_prompt's negative embeddings "
                         "(do_classifier_free_guidance=True)")
    uncond = conditioning.kwargs(negative=True, device=device, dtype=adapter.dtype)
    return CFGDenoiser(denoiser, cfg_scale), {"cond": cond, "uncond": uncond}


def generate_flow(
    family: type[FlowTransformer], student_transformer: Any, teacher_transformer: Any, conditioning: FlowConditioning,
    preset: Any, *, teacher: Any = None, teacher_conditioning: FlowConditioning | None = None, seeds: Sequence[int],
    height: int = 1024, width: int = 1024, lam: float | None = None, k: int | None = None,
    guided_steps: Sequence[int] | None = None, renoise: str | None = None, renoise_sigma: RenoiseSigma = None,
    scheduler_config: Mapping[str, Any] | None = None, vae: Any = None, device: torch.device | str | None = None,
    disable: bool | None = None, callback: Callable[[dict], Any] | None = None,
) -> Any:
    """Sample a batch with a flow student and its flow teacher (the shared body of the families' ``generate``).

    Args:
        family: the adapter class (:class:`kdpp.diffusers.sd3.SD3Velocity` or
            :class:`kdpp.diffusers.flux.FluxVelocity`); both transformers must be of it.
        student_transformer: the student's diffusers transformer.
        teacher_transformer: the teacher's (the same latent space: channels and packing are checked).
        conditioning: the batch's text embeddings (:class:`FlowConditioning`).
        preset: the student's :class:`kdpp.diffusers.flow_presets.FlowStudentPreset` (steps,
            scheduler config, sampler, its own guidance, Distillation++ defaults).
        teacher: the :class:`kdpp.diffusers.flow_presets.FlowTeacherPreset` (default: the preset's).
        teacher_conditioning: the teacher's embeddings when they differ (FLUX.1-schnell is run with
            256 T5 tokens, FLUX.1-dev with 512); default ``conditioning``.
        seeds: one int per image (a list, also of one): its initial noise ``randn([C, h, w])`` from
            ``torch.Generator().manual_seed(seed)`` on the CPU (what the pipelines draw with a list
            of CPU generators), and streams 1 and 2 of it for the solver and renoise noise.
        height: image height in pixels, a positive multiple of the family's (FLUX 16, SD3 8 x patch size).
        width: image width in pixels, the same.
        lam: Distillation++ guidance scale (default: the preset's).
        k: guided steps (default: the preset's).
        guided_steps: the step indices to guide instead of the first ``k`` (negative ones count
            from the end; needs the core's ``guided_steps`` option).
        renoise: the renoising noise (see :class:`kdpp.TeacherRefinement`; default: the
            preset's, ``"guidance"`` for one-step students).
        renoise_sigma: the renoising level (see :class:`kdpp.TeacherRefinement`; default ``"next"``).
        scheduler_config: the student's ``FlowMatchEulerDiscreteScheduler`` config (e.g.
            ``pipe.scheduler.config``); default: the preset's copy of the published one.
        vae: decode to PIL images when given (else the latents ``[B, C, h, w]`` are returned).
        device: where to sample (default: the student's device).
        disable: disable the progress bar.
        callback: the sampler's per-step callback (its ``x`` is the VE state).
    Returns:
        a list of PIL images (with ``vae``) or the final latents ``[B, C, h, w]`` (float32,
        unpacked; FLUX's packing happens inside each call).
    """
    guided_steps = None if guided_steps is None else list(guided_steps)  # an iterator is read more than once
    check_type(conditioning, FlowConditioning, "conditioning")
    check_type(preset, FlowStudentPreset, "preset")
    teacher = preset.teacher if teacher is None else teacher
    check_type(teacher, FlowTeacherPreset, "teacher")
    teacher_conditioning = conditioning if teacher_conditioning is None else teacher_conditioning
    check_type(teacher_conditioning, FlowConditioning, "teacher_conditioning")
    if preset.family != family.family:
        raise ValueError(f"preset {preset.name!r} is a {preset.family!r} preset, this generate samples {family.family!r}")
    if teacher.family != family.family:
        raise ValueError(f"teacher preset {teacher.name!r} is a {teacher.family!r} preset, not {family.family!r}")
    seeds = check_seeds(seeds)
    scheduler_config = preset.scheduler_config if scheduler_config is None else scheduler_config
    if scheduler_config.get("stochastic_sampling") and preset.sampler != "lcm":
        raise ValueError(f"scheduler_config sets stochastic_sampling (an x0 + fresh noise step: kdpp's 'lcm' sampler), "
                         f"but preset {preset.name!r} samples with {preset.sampler!r}")
    train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
    student_model = family(student_transformer, "student_transformer", preset.guidance, train_steps)
    teacher_model = family(teacher_transformer, "teacher_transformer", teacher.guidance, train_steps)
    if student_model.latent_channels != teacher_model.latent_channels:
        raise ValueError(f"student and teacher latent spaces differ: student_transformer takes "
                         f"{student_model.latent_channels} latent channels, teacher_transformer "
                         f"{teacher_model.latent_channels}; Distillation++ needs a shared latent space")
    shape = student_model.latent_shape(height, width)
    if vae is not None:
        check_vae(vae, shape[0], "the transformers take")
    batch = len(seeds)
    conditioning.check_batch(batch, "conditioning")
    teacher_conditioning.check_batch(batch, "teacher_conditioning")
    student_model.check_conditioning(conditioning, "conditioning")
    teacher_model.check_conditioning(teacher_conditioning, "teacher_conditioning")
    device = model_device(student_transformer) if device is None else torch.device(device)
    # a teacher that is never called needs no negative embeddings for its CFG
    teacher_cfg = teacher.cfg_scale if calls_teacher(preset, lam, k, guided_steps) else 1.0

    ts = student_model.schedule(scheduler_config, preset.steps, shape[1], shape[2])
    student, extra_args = flow_denoiser(student_model, conditioning, preset.cfg_scale, device)
    teacher_denoiser, teacher_extra_args = flow_denoiser(teacher_model, teacher_conditioning, teacher_cfg, device,
                                                         "teacher_conditioning")
    latents = sample_batch(
        student, teacher_denoiser, preset, seeds, shape, sigmas=flow_sigmas(ts), noise_scale=initial_noise_scale(ts),
        lam=lam, k=k, guided_steps=guided_steps, renoise=renoise, renoise_sigma=renoise_sigma, dtype=torch.float32,
        device=device, extra_args=extra_args, teacher_extra_args=teacher_extra_args, disable=disable, callback=callback)
    return latents if vae is None else decode(vae, latents)
