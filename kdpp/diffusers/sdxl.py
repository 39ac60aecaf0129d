"""SDXL students with an SDXL teacher: from loaded diffusers components to Distillation++ samples.

Needs the ``kdpp[diffusers]`` extra only for decoding to PIL images (``vae``); the sampling
itself takes any UNet-like callables. Text encoding is the caller's (``pipe.encode_prompt``
gives the embeddings), so batches of precomputed embeddings work the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..cfg import CFGDenoiser
from ..schedules import scaled_linear_alphas_cumprod
from .presets import StudentPreset, TeacherPreset
from .sampling import sample_batch, to_pil
from .vp import VPDenoiser, guidance_scale_embedding


@dataclass
class SDXLConditioning:
    """SDXL text conditioning for a batch: what ``StableDiffusionXLPipeline.encode_prompt`` returns."""

    prompt_embeds: Tensor  #: [B, 77, 2048]
    pooled_prompt_embeds: Tensor  #: [B, 1280]
    negative_prompt_embeds: Tensor
    negative_pooled_prompt_embeds: Tensor

    def unet_kwargs(self, time_ids: Tensor, negative: bool = False) -> dict[str, Any]:
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


def generate(
    student_unet: Any, teacher_unet: Any, conditioning: SDXLConditioning, preset: StudentPreset, *,
    teacher: TeacherPreset = TeacherPreset(), seeds: Sequence[int], height: int = 1024, width: int = 1024,
    lam: float | None = None, k: int | None = None, renoise: str = "random", alphas_cumprod: Tensor | None = None,
    student_guidance: float | None = None, vae: Any = None, dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None, disable: bool | None = None, callback: Any = None,
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
        width: image width. The student's time_ids use ``preset.resolution`` when it differs
            (SDXL-Turbo: 512).
        lam: Distillation++ guidance scale (default: the preset's).
        k: guided steps (default: the preset's).
        renoise: the renoising noise (see :class:`kdpp.TeacherRefinement`).
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
    batch = len(seeds)
    if conditioning.prompt_embeds.shape[0] != batch:
        raise ValueError(f"conditioning has batch {conditioning.prompt_embeds.shape[0]}, seeds has {batch}")
    cond = SDXLConditioning(*(t.to(device=device, dtype=dtype) for t in (
        conditioning.prompt_embeds, conditioning.pooled_prompt_embeds,
        conditioning.negative_prompt_embeds, conditioning.negative_pooled_prompt_embeds)))

    timestep_cond = None
    if student_guidance is not None and _config(student_unet, "time_cond_proj_dim"):
        timestep_cond = guidance_scale_embedding(student_guidance, _config(student_unet, "time_cond_proj_dim"))
    student = VPDenoiser(student_unet, a, preset.prediction, lcm_boundary={} if preset.lcm_boundary else None,
                         timestep_cond=timestep_cond)
    teacher_model = CFGDenoiser(VPDenoiser(teacher_unet, a, teacher.prediction), teacher.cfg_scale)
    student_ids = time_ids(preset.resolution, preset.resolution) if preset.resolution != max(height, width) else time_ids(height, width)
    teacher_ids = time_ids(height, width)

    latents = sample_batch(
        student, teacher_model, preset, seeds, (4, height // 8, width // 8), sigmas=preset.sigmas(a),
        noise_scale=preset.initial_noise_scale(a), lam=lam, k=k, renoise=renoise, dtype=dtype, device=device,
        extra_args=cond.unet_kwargs(student_ids),
        teacher_extra_args={"cond": cond.unet_kwargs(teacher_ids), "uncond": cond.unet_kwargs(teacher_ids, negative=True)},
        disable=disable, callback=callback)
    with torch.no_grad():
        if vae is None:
            return latents
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return to_pil(images)
