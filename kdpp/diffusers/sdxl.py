"""SDXL students with an SDXL teacher: from loaded diffusers components to Distillation++ samples.

Needs the ``kdpp[diffusers]`` extra only for decoding to PIL images (``vae``); the sampling
itself takes any UNet-like callables. Text encoding is the caller's (``pipe.encode_prompt``
gives the embeddings), so batches of precomputed embeddings work the same way.
"""
from __future__ import annotations

import numbers
import warnings
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch
from torch import Tensor

from ..cfg import CFGDenoiser
from ..schedules import scaled_linear_alphas_cumprod
from .presets import GUIDANCE_SPACES, StudentPreset, TeacherPreset
from .sampling import sample_batch, to_pil
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
        order = ("in encode_prompt's order: prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, "
                 "negative_pooled_prompt_embeds")
        for name, ndim, what in (("prompt_embeds", 3, "[batch, tokens, dim]"), ("negative_prompt_embeds", 3, "[batch, tokens, dim]"),
                                 ("pooled_prompt_embeds", 2, "[batch, dim]"), ("negative_pooled_prompt_embeds", 2, "[batch, dim]")):
            value = getattr(self, name)
            if not isinstance(value, Tensor):
                raise TypeError(f"SDXLConditioning.{name} must be a tensor {what}, got {type(value).__name__} ({order})")
            if value.ndim != ndim:
                raise ValueError(f"SDXLConditioning.{name} must be {what}, got shape {tuple(value.shape)} ({order}; "
                                 "pass negative_prompt_embeds too, i.e. do_classifier_free_guidance=True)")
        for neg, pos in (("negative_prompt_embeds", "prompt_embeds"), ("negative_pooled_prompt_embeds", "pooled_prompt_embeds")):
            if getattr(self, neg).shape != getattr(self, pos).shape:
                raise ValueError(f"SDXLConditioning.{neg} has shape {tuple(getattr(self, neg).shape)}, "
                                 f"{pos} {tuple(getattr(self, pos).shape)}; they must match ({order})")
        if self.pooled_prompt_embeds.shape[0] != self.prompt_embeds.shape[0]:
            raise ValueError(f"SDXLConditioning.pooled_prompt_embeds has batch {self.pooled_prompt_embeds.shape[0]}, "
                             f"prompt_embeds {self.prompt_embeds.shape[0]}")

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> "SDXLConditioning":
        """Every field on ``device`` in ``dtype``."""
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


def vp_denoisers(
    student_unet: Any, teacher_unet: Any, preset: StudentPreset, teacher: TeacherPreset = TeacherPreset(),
    alphas_cumprod: Tensor | None = None, student_guidance: float | None = None,
) -> tuple[VPDenoiser, CFGDenoiser]:
    """The student's VE denoiser as ``preset`` samples it, and the teacher's with CFG at ``teacher.cfg_scale``.

    The student gets LCM's boundary condition when the preset has one, and the guidance-scale
    embedding of ``student_guidance`` as ``timestep_cond`` when its UNet takes one.
    """
    a = scaled_linear_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
    timestep_cond = None
    if student_guidance is not None and _config(student_unet, "time_cond_proj_dim"):
        timestep_cond = guidance_scale_embedding(student_guidance, _config(student_unet, "time_cond_proj_dim"))
    student = VPDenoiser(student_unet, a, preset.prediction, lcm_boundary={} if preset.lcm_boundary else None,
                         timestep_cond=timestep_cond)
    return student, CFGDenoiser(VPDenoiser(teacher_unet, a, teacher.prediction), teacher.cfg_scale)


def generate(
    student_unet: Any, teacher_unet: Any, conditioning: SDXLConditioning, preset: StudentPreset, *,
    teacher: TeacherPreset = TeacherPreset(), seeds: Sequence[int], height: int = 1024, width: int = 1024,
    lam: float | None = None, k: int | None = None, renoise: str | None = None, guidance_space: str | None = None,
    alphas_cumprod: Tensor | None = None, student_guidance: float | None = None, vae: Any = None,
    dtype: torch.dtype = torch.float16, device: torch.device | str | None = None, disable: bool | None = None,
    callback: Any = None,
) -> Any:
    """Sample a batch with a distilled SDXL student and the SDXL base teacher (with CFG).

    Args:
        student_unet: the student's diffusers ``UNet2DConditionModel`` (or a compatible callable).
        teacher_unet: the teacher's (SDXL base) UNet.
        conditioning: the batch's text embeddings (:class:`SDXLConditioning`).
        preset: the student's schedule and sampler (:mod:`kdpp.diffusers.presets`).
        teacher: the teacher preset (CFG scale).
        seeds: one seed per image: its initial noise (``torch.Generator().manual_seed(seed)``, on
            the CPU, so images reproduce across devices), and streams 1 and 2 of it
            (:func:`kdpp.noise.stream_seed`) for its solver and renoise noise.
        height: image height (latents are ``[4, height/8, width/8]``).
        width: image width. Student and teacher both get ``time_ids`` of ``(height, width)``,
            as diffusers' pipelines do (``preset.resolution`` is only the recommended size).
        lam: Distillation++ guidance scale (default: the preset's); in ``guidance_space``.
        k: guided steps (default: the preset's).
        renoise: the renoising noise (see :class:`kdpp.TeacherRefinement`; default: the
            preset's, ``"guidance"`` for one-step students).
        guidance_space: ``"x0"`` (the core's ``R = D + lam (T - D)``) or ``"epsilon"`` (the
            authors' epsilon-space mix, :class:`kdpp.diffusers.vp.EpsilonSpaceGuidance`;
            ``lam`` must then be a float). Default: the preset's.
        alphas_cumprod: the training schedule (default: SD/SDXL's scaled_linear).
        student_guidance: LCM's guidance-scale embedding input (``timestep_cond``), if the UNet has one.
        vae: decode to PIL images when given (else latents are returned).
        dtype: the latents' and embeddings' dtype.
        device: where to sample (default: the student's device).
        disable: disable the progress bar.
        callback: the sampler's per-step callback.
    Returns:
        a list of PIL images (with ``vae``) or the final latents ``[B, 4, h, w]``.
    """
    check_shared_latent_space(student_unet, teacher_unet)
    if device is None:
        device = next(student_unet.parameters()).device if hasattr(student_unet, "parameters") else torch.device("cpu")
    a = scaled_linear_alphas_cumprod() if alphas_cumprod is None else torch.as_tensor(alphas_cumprod)
    if conditioning.batch != len(seeds):
        raise ValueError(f"conditioning has batch {conditioning.batch}, seeds has {len(seeds)}")
    cond = conditioning.to(device, dtype)

    student, teacher_model = vp_denoisers(student_unet, teacher_unet, preset, teacher, a, student_guidance)
    ids = time_ids(height, width)  # diffusers' pipelines: original and target size (h, w), for both models

    sigmas = preset.sigmas(a)
    lam = preset.lam if lam is None else lam
    k = preset.k if k is None else k
    renoise = preset.renoise if renoise is None else renoise
    space = preset.guidance_space if guidance_space is None else guidance_space
    if space not in GUIDANCE_SPACES:
        raise ValueError(f"guidance_space must be one of {GUIDANCE_SPACES}, got {space!r}")
    if len(sigmas) == 2 and renoise != "guidance" and k and lam:
        warnings.warn(f"{preset.name} samples one step: with renoise={renoise!r} the renoise level is the next sigma, "
                      "0, and the teacher is never called; renoise='guidance' guides it at the current level",
                      stacklevel=2)
    if space == "epsilon" and k and lam:
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
            raise TypeError(f"lam must be a float with guidance_space='epsilon', got {lam!r}")
        pair = EpsilonSpaceGuidance(student, teacher_model, lam)
        student, teacher_model, lam = pair.student, pair.teacher, 1.0

    latents = sample_batch(
        student, teacher_model, preset, seeds, (4, height // 8, width // 8), sigmas=sigmas,
        noise_scale=preset.initial_noise_scale(a), lam=lam, k=k, renoise=renoise, dtype=dtype, device=device,
        extra_args=cond.unet_kwargs(ids),
        teacher_extra_args={"cond": cond.unet_kwargs(ids), "uncond": cond.unet_kwargs(ids, negative=True)},
        disable=disable, callback=callback)
    with torch.no_grad():
        if vae is None:
            return latents
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return to_pil(images)
