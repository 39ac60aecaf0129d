"""SDXL students with an SDXL teacher: the SDXL family of the one generation body.

:class:`SDXLFamily` does what ``StableDiffusionXLPipeline`` does around its UNets: latents
``[B, 4, H/8, W/8]``, each UNet a VP model as a VE denoiser (:class:`kdpp.diffusers.vp.VPDenoiser`:
the preset's timesteps on the training schedule, its prediction type and LCM's boundary
condition), the ``added_cond_kwargs`` of SDXL's micro-conditioning, the teacher's CFG as one
batched call; :func:`generate` samples a batch through :func:`kdpp.diffusers.sampling.sample`.
Needs the ``kdpp[diffusers]`` extra only for decoding to PIL images (``vae``); the sampling itself
takes any UNet-like callables. Text encoding is the caller's (``pipe.encode_prompt`` gives the
embeddings).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .._checks import check_finite_number
from ..cfg import CFGDenoiser
from ..schedules import scaled_linear_alphas_cumprod
from . import sampling
from .presets import GUIDANCE_SPACES, StudentPreset, TeacherPreset
from .sampling import (Denoisers, Family, ModelCall, check_attention_kwargs, check_embeddings, check_image_size,
                       check_type, check_vae, model_device, model_dtype)
from .vp import EpsilonSpaceGuidance, VPDenoiser, guidance_scale_embedding


@dataclass
class SDXLConditioning:
    """SDXL text conditioning for a batch, in the order ``StableDiffusionXLPipeline.encode_prompt`` returns it.

    ``SDXLConditioning(*pipe.encode_prompt(prompts, do_classifier_free_guidance=True))`` works:
    the fields are ``(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
    negative_pooled_prompt_embeds)``, checked on construction (``[B, L, D]`` token embeddings,
    ``[B, P]`` pooled ones, negatives shaped as the prompts).
    """

    prompt_embeds: Tensor  #: [B, 77, 2048]
    negative_prompt_embeds: Tensor  #: [B, 77, 2048]
    pooled_prompt_embeds: Tensor  #: [B, 1280]
    negative_pooled_prompt_embeds: Tensor  #: [B, 1280]

    def __post_init__(self):
        check_embeddings(self, "in encode_prompt's order: prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, "
                         "negative_pooled_prompt_embeds; pass negative_prompt_embeds too, i.e. "
                         "encode_prompt(..., do_classifier_free_guidance=True)")

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SDXLConditioning":
        """Every field on ``device`` in ``dtype`` (``None``: as it is)."""
        return SDXLConditioning(*(getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)))

    def unet_kwargs(self, time_ids: Tensor, negative: bool = False) -> dict[str, Any]:
        """The UNet's ``encoder_hidden_states`` and ``added_cond_kwargs`` (the negative prompt's with ``negative``)."""
        emb = self.negative_prompt_embeds if negative else self.prompt_embeds
        pooled = self.negative_pooled_prompt_embeds if negative else self.pooled_prompt_embeds
        return {"encoder_hidden_states": emb,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(emb).expand(emb.shape[0], -1)}}


def time_ids(height: int, width: int, crop: tuple[int, int] = (0, 0)) -> Tensor:
    """SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    return torch.tensor([[height, width, *crop, height, width]], dtype=torch.float32)


def check_time_ids(value: Any, name: str, default: Tensor) -> Tensor:
    """``value`` as SDXL's ``[1, 6]`` micro-conditioning (``default`` for ``None``); errors name ``name``."""
    if value is None:
        return default
    if not isinstance(value, Tensor) or value.numel() != 6:
        raise ValueError(f"{name} must be a tensor of SDXL's 6 micro-conditioning values (orig_h, orig_w, crop_top, "
                         f"crop_left, target_h, target_w), got {value!r:.80}")
    return value.detach().reshape(1, 6).float()


def _config(unet, key, default=None):
    config = getattr(unet, "config", None)
    return getattr(config, key, default) if config is not None else default


def check_shared_latent_space(student_unet, teacher_unet, student_vae=None, teacher_vae=None) -> None:
    """Raise ``ValueError`` unless student and teacher work in the same latent space."""
    for key in ("in_channels", "out_channels"):
        a, b = _config(student_unet, key), _config(teacher_unet, key)
        if a is not None and b is not None and a != b:
            raise ValueError(f"student and teacher latent spaces differ: {key} {a} vs {b}; "
                             "Distillation++ needs a shared latent space (a decode/encode bridge is not supported)")
    if student_vae is not None and teacher_vae is not None:
        for key in ("scaling_factor", "latent_channels"):
            a, b = _config(student_vae, key), _config(teacher_vae, key)
            if a != b:
                raise ValueError(f"student and teacher latent spaces differ: VAE {key} {a} vs {b}")


def check_sdxl_unet(unet: Any, name: str, conditioning: SDXLConditioning | None = None) -> None:
    """Refuse a model whose config is not an SDXL UNet's, or ``conditioning`` of other widths than it takes.

    Checked where the config says: ``cross_attention_dim`` (the token embeddings' width),
    ``addition_embed_type == "text_time"`` (SDXL's pooled-text and size conditioning) and
    ``projection_class_embeddings_input_dim - 6 addition_time_embed_dim`` (the pooled
    embeddings' width). Callables without a config are taken as they are.
    """
    config = getattr(unet, "config", None)
    if config is None:
        return
    width = _config(unet, "cross_attention_dim")
    if width is None or _config(unet, "addition_embed_type") != "text_time":
        raise ValueError(f"{name} is not an SDXL UNet (UNet2DConditionModel with cross_attention_dim and "
                         f"addition_embed_type='text_time'), got {type(unet).__name__}")
    if conditioning is None:
        return
    if isinstance(width, int) and conditioning.prompt_embeds.shape[-1] != width:
        raise ValueError(f"conditioning.prompt_embeds has width {conditioning.prompt_embeds.shape[-1]}, {name} takes "
                         f"{width} (its config.cross_attention_dim): the embeddings must come from this model's text encoders")
    projection, time_dim = _config(unet, "projection_class_embeddings_input_dim"), _config(unet, "addition_time_embed_dim")
    if isinstance(projection, int) and isinstance(time_dim, int):
        pooled = projection - 6 * time_dim  # pooled text embeddings, then 6 time ids of time_dim features
        if conditioning.pooled_prompt_embeds.shape[-1] != pooled:
            raise ValueError(f"conditioning.pooled_prompt_embeds has width {conditioning.pooled_prompt_embeds.shape[-1]}, "
                             f"{name} takes {pooled} (config.projection_class_embeddings_input_dim {projection} "
                             f"- 6 time ids x addition_time_embed_dim {time_dim})")


#: StableDiffusionXLPipeline's default guidance_scale, whose embedding it passes to UNets with time_cond_proj_dim
PIPELINE_GUIDANCE_SCALE = 5.0


def student_timestep_cond(student_unet: Any, student_guidance: float | None) -> Tensor | None:
    """The ``timestep_cond`` the student gets: LCM's guidance-scale embedding, where its UNet takes one.

    As ``StableDiffusionXLPipeline``: a UNet with ``config.time_cond_proj_dim`` always gets the
    embedding of ``guidance_scale - 1`` (:func:`kdpp.diffusers.vp.guidance_scale_embedding` of
    ``student_guidance``, default the pipeline's ``guidance_scale`` 5.0); one without gets none,
    and ``student_guidance`` given for it is an error.
    """
    dim = _config(student_unet, "time_cond_proj_dim")
    if dim is None:
        if student_guidance is not None:
            raise ValueError(f"student_guidance={student_guidance!r} is the input of LCM's guidance-scale embedding, but "
                             "student_unet has none (its config.time_cond_proj_dim is not set); leave it out")
        return None
    w = PIPELINE_GUIDANCE_SCALE if student_guidance is None else check_finite_number(student_guidance, "student_guidance")
    return guidance_scale_embedding(w, dim)


def check_alphas_cumprod(alphas_cumprod: Tensor | None, preset: StudentPreset) -> Tensor:
    """The training schedule (default SD/SDXL's scaled_linear), refused unless 1-D in (0, 1] and long enough for ``preset``."""
    if alphas_cumprod is None:
        return scaled_linear_alphas_cumprod()
    a = torch.as_tensor(alphas_cumprod)
    if a.ndim != 1 or not a.is_floating_point():
        raise ValueError(f"alphas_cumprod must be a 1-D float tensor (one value per training timestep), got {a.dtype} "
                         f"of shape {tuple(a.shape)}")
    if len(a) <= max(preset.timesteps):
        raise ValueError(f"alphas_cumprod has {len(a)} entries, preset {preset.name!r} samples timestep "
                         f"{max(preset.timesteps)}: pass the schedule the model was trained with "
                         "(e.g. scheduler.alphas_cumprod)")
    if not bool(((a > 0) & (a <= 1)).all()):
        raise ValueError("alphas_cumprod must lie in (0, 1]")
    return a


def vp_denoisers(
    student_unet: Any, teacher_unet: Any, preset: StudentPreset, teacher: TeacherPreset = TeacherPreset(),
    alphas_cumprod: Tensor | None = None, student_guidance: float | None = None,
) -> tuple[VPDenoiser, CFGDenoiser | None]:
    """The student's VE denoiser as ``preset`` samples it, and the teacher's with CFG at ``teacher.cfg_scale``.

    The student gets LCM's boundary condition when the preset has one, and, when its UNet has
    ``time_cond_proj_dim``, the guidance-scale embedding of ``student_guidance`` (default 5.0,
    as the pipeline) as ``timestep_cond`` (:func:`student_timestep_cond`). A ``teacher_unet`` of
    ``None`` gives no teacher. For a kdpp sampler of your own; LoRA students:
    ``vp_denoisers(pair.student, pair.teacher, preset)`` with a :class:`kdpp.diffusers.lora.SharedLoRAModel`.
    """
    check_type(preset, StudentPreset, "preset")
    check_type(teacher, TeacherPreset, "teacher")
    a = check_alphas_cumprod(alphas_cumprod, preset)
    student = VPDenoiser(student_unet, a, preset.prediction, lcm_boundary={} if preset.lcm_boundary else None,
                         timestep_cond=student_timestep_cond(student_unet, student_guidance))
    if teacher_unet is None:
        return student, None
    return student, CFGDenoiser(VPDenoiser(teacher_unet, a, teacher.prediction), teacher.cfg_scale)


class SDXLFamily(Family):
    """SDXL UNets (a distilled student, the SDXL base teacher with CFG) bound to a batch's conditioning and size.

    Args:
        student_unet: the student's diffusers ``UNet2DConditionModel`` (or a compatible callable).
        teacher_unet: the teacher's (SDXL base) UNet; ``None`` for runs that never call it.
        conditioning: the batch's text embeddings (:class:`SDXLConditioning`).
        preset: the student's schedule and sampler (:mod:`kdpp.diffusers.presets`).
        teacher: the teacher preset (CFG scale).
        height: image height in pixels, a positive multiple of 8 (latents are ``[4, height/8, width/8]``).
        width: image width, the same. Student and teacher both get ``time_ids`` of ``(height, width)``,
            as diffusers' pipelines do (``preset.resolution`` is only the recommended size), unless
            ``add_time_ids`` is given.
        guidance_space: ``"x0"`` (the core's ``R = D + lam (T - D)``) or ``"epsilon"`` (the
            authors' epsilon-space mix, :class:`kdpp.diffusers.vp.EpsilonSpaceGuidance`;
            ``lam`` must then be a float). Default: the preset's.
        alphas_cumprod: the training schedule (default: SD/SDXL's scaled_linear).
        student_guidance: the guidance scale whose embedding a student UNet with
            ``time_cond_proj_dim`` (LCM) gets as ``timestep_cond``; default 5.0, what
            ``StableDiffusionXLPipeline`` passes by default. An error for UNets without one.
        dtype: the sampler state's dtype (default: the student UNet's); each UNet gets its
            inputs and embeddings in its own dtype, so student and teacher may differ.
        device: where to sample (default: the student's device).
        attention_kwargs: the student UNet's ``cross_attention_kwargs`` on every call (e.g.
            ``{"scale": 0.8}``, a LoRA scale); ``teacher_attention_kwargs`` the teacher's.
        add_time_ids: SDXL's micro-conditioning ``(orig_h, orig_w, crop_top, crop_left, target_h,
            target_w)`` (6 values, e.g. ``pipe._get_add_time_ids(original_size, crops_coords_top_left,
            target_size, ...)``) for the student and the teacher's conditional half; default
            :func:`time_ids` ``(height, width)``. ``negative_add_time_ids``: the teacher's
            unconditional half's (the pipeline's ``negative_original_size`` etc.); default ``add_time_ids``.
    """

    name = "sdxl"
    teacher_arg = "teacher_unet"

    def __init__(
        self, student_unet: Any, teacher_unet: Any, conditioning: SDXLConditioning, preset: StudentPreset, *,
        teacher: TeacherPreset = TeacherPreset(), height: int = 1024, width: int = 1024, guidance_space: str | None = None,
        alphas_cumprod: Tensor | None = None, student_guidance: float | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None, attention_kwargs: dict[str, Any] | None = None,
        teacher_attention_kwargs: dict[str, Any] | None = None, add_time_ids: Tensor | None = None,
        negative_add_time_ids: Tensor | None = None,
    ):
        check_type(conditioning, SDXLConditioning, "conditioning")
        check_type(preset, StudentPreset, "preset")
        check_type(teacher, TeacherPreset, "teacher")
        check_image_size(height, width, 8, "SDXL's VAE downsamples 8x, as StableDiffusionXLPipeline requires")
        check_sdxl_unet(student_unet, "student_unet", conditioning)
        if teacher_unet is not None:
            check_sdxl_unet(teacher_unet, "teacher_unet", conditioning)
            check_shared_latent_space(student_unet, teacher_unet)
        dtype = model_dtype(student_unet, torch.float32) if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.guidance_space = preset.guidance_space if guidance_space is None else guidance_space
        if self.guidance_space not in GUIDANCE_SPACES:
            raise ValueError(f"guidance_space must be one of {GUIDANCE_SPACES}, got {self.guidance_space!r}")
        self.alphas_cumprod = check_alphas_cumprod(alphas_cumprod, preset)
        student_timestep_cond(student_unet, student_guidance)  # refuses student_guidance for a UNet without an embedding
        self.student_model, self.teacher_model, self.conditioning = student_unet, teacher_unet, conditioning
        self.preset, self.teacher, self.student_guidance = preset, teacher, student_guidance
        self.attention_kwargs = check_attention_kwargs(attention_kwargs, "attention_kwargs")
        self.teacher_attention_kwargs = check_attention_kwargs(teacher_attention_kwargs, "teacher_attention_kwargs")
        self.channels = _config(student_unet, "out_channels", 4)
        self.shape = (self.channels, height // 8, width // 8)
        # diffusers' pipelines: original and target size (h, w), for both (unless given)
        self.time_ids = check_time_ids(add_time_ids, "add_time_ids", time_ids(height, width))
        self.negative_time_ids = check_time_ids(negative_add_time_ids, "negative_add_time_ids", self.time_ids)
        self.sigmas = preset.sigmas(self.alphas_cumprod)
        self.noise_scale = preset.initial_noise_scale(self.alphas_cumprod)
        self.dtype = dtype
        self.device = model_device(student_unet) if device is None else torch.device(device)

    def check_batch(self, batch: int) -> None:
        if self.conditioning.batch != batch:
            raise ValueError(f"conditioning has batch {self.conditioning.batch}, seeds has {batch}")

    def denoisers(self, lam: Any, guided: bool) -> Denoisers:
        key = "cross_attention_kwargs"
        student_unet = ModelCall(self.student_model, sampling.STUDENT_CONTEXT, key, self.attention_kwargs)
        teacher_unet = (ModelCall(self.teacher_model, sampling.TEACHER_CONTEXT, key, self.teacher_attention_kwargs)
                        if guided else None)
        student, teacher = vp_denoisers(student_unet, teacher_unet, self.preset, self.teacher, self.alphas_cumprod,
                                        self.student_guidance)
        extra_args = self.conditioning.to(self.device, model_dtype(self.student_model, self.dtype)).unet_kwargs(self.time_ids)
        teacher_extra_args = {}
        if guided:
            cond = self.conditioning.to(self.device, model_dtype(self.teacher_model, self.dtype))
            teacher_extra_args = {"cond": cond.unet_kwargs(self.time_ids),
                                  "uncond": cond.unet_kwargs(self.negative_time_ids, negative=True)}
            if self.guidance_space == "epsilon":
                if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
                    raise TypeError(f"lam must be a float with guidance_space='epsilon', got {lam!r}")
                pair = EpsilonSpaceGuidance(student, teacher, lam)
                student, teacher, lam = pair.student, pair.teacher, 1.0
        return Denoisers(student, teacher, extra_args, teacher_extra_args, lam)

    def check_vae(self, vae: Any) -> None:
        check_vae(vae, self.channels, "the UNets take")

    def decode(self, vae: Any, latents: Tensor) -> list:
        return sampling.decode(vae, latents)


def generate(student_unet: Any, teacher_unet: Any, conditioning: SDXLConditioning, preset: StudentPreset,
             **options: Any) -> Any:
    """Sample a batch with a distilled SDXL student and the SDXL base teacher (with CFG).

    The family options (``teacher``, ``height``, ``width``, ``guidance_space``, ``alphas_cumprod``,
    ``student_guidance``, ``dtype``, ``device``, ``attention_kwargs``, ...) are
    :class:`SDXLFamily`'s; the sampling options (``seeds``, ``lam``, ``k``, ``guided_steps``,
    ``renoise``, ``renoise_sigma``, ``latents``, ``vae``, ``callback``, ``disable``) those of
    :func:`kdpp.diffusers.sampling.generate`. Returns the final latents ``[B, 4, h, w]``, or PIL
    images with ``vae`` (decoded as the SDXL pipeline does: ``force_upcast``,
    ``latents_mean``/``latents_std``). LoRA students: ``generate(pair.student, pair.teacher, ...)``
    with a :class:`kdpp.diffusers.lora.SharedLoRAModel`.
    """
    return sampling.generate(SDXLFamily, student_unet, teacher_unet, conditioning, preset, **options)
