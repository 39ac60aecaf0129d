"""What every diffusers family's ``generate`` shares: per-image seeds, the preset's sampler, images.

A family module (:mod:`kdpp.diffusers.sdxl`, ...) turns its models and conditioning into a
student and a teacher VE denoiser plus their keyword arguments; :func:`sample_batch` draws the
initial noise and runs the preset's kdpp sampler; :func:`decode` turns latents into PIL images
through the family's VAE. Nothing here imports diffusers.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..noise import seeded_noise_sampler, stream_seed
from ..refine import Denoiser
from ..solvers import SAMPLERS


def sample_batch(
    student: Denoiser, teacher: Denoiser, preset: Any, seeds: Sequence[int], shape: Sequence[int], *,
    sigmas: Tensor, noise_scale: float, lam: float | None, k: int | None, renoise: str, dtype: torch.dtype,
    device: torch.device | str, extra_args: Mapping[str, Any], teacher_extra_args: Mapping[str, Any],
    disable: bool | None = None, callback: Callable[[dict], Any] | None = None, guided_steps: Sequence[int] | None = None,
) -> Tensor:
    """Sample one latent per seed with ``preset``'s kdpp sampler; returns ``[len(seeds), *shape]``.

    Image ``b`` starts from ``noise_scale * randn(shape)`` drawn on the CPU by
    ``torch.Generator().manual_seed(seeds[b])`` (so images reproduce across devices and batch
    sizes); its solver noise and renoise noise are streams 1 and 2 of the same seed
    (:func:`kdpp.noise.stream_seed`). ``lam`` and ``k`` default to the preset's; ``guided_steps``
    (step indices, negative ones from the end) replaces ``k`` and is passed on only when given.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("seeds must name at least one image")
    noise = seeded_noise_sampler(torch.empty(len(seeds), *shape), seeds)(0.0, 0.0)  # on the CPU
    x = (noise * noise_scale).to(device=device, dtype=dtype)
    options: dict[str, Any] = {}
    if guided_steps is not None:
        options["guided_steps"] = list(guided_steps)
    elif k is None:
        k = preset.k
    if preset.sampler != "dpmpp_2m":  # the only solver without solver noise
        options["noise_sampler"] = seeded_noise_sampler(x, [stream_seed(s, 1) for s in seeds])
    with torch.no_grad():
        return SAMPLERS[preset.sampler](
            student, teacher, x, sigmas, preset.lam if lam is None else lam, k,
            extra_args=extra_args, teacher_extra_args=teacher_extra_args, renoise=renoise,
            renoise_seed=[stream_seed(s, 2) for s in seeds], disable=disable, callback=callback, **options)


def to_pil(images: Tensor) -> list:
    """Decoded images in ``[-1, 1]``, ``[B, C, H, W]``, as a list of PIL images."""
    from PIL import Image

    arrays = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in arrays]


def decode(vae: Any, latents: Tensor) -> list:
    """Latents as PIL images: ``vae.decode(latents / scaling_factor + shift_factor)`` (no shift where the VAE has none)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample
    return to_pil(images)
