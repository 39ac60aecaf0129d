"""What every diffusers family's ``generate`` shares: argument checks, per-image seeds, the preset's sampler, images.

A family module (:mod:`kdpp.diffusers.sdxl`, ...) turns its models and conditioning into a
student and a teacher VE denoiser plus their keyword arguments; :func:`sample_batch` draws the
initial noise and runs the preset's kdpp sampler; :func:`decode` turns latents into PIL images
through the family's VAE, as diffusers' pipelines decode. The checks of what every ``generate``
takes (:func:`check_seeds`, :func:`check_image_size`, :func:`check_type`, :func:`check_vae`) live
here too. Nothing here imports diffusers.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from .._checks import SEED_RANGE, _index, _ints
from ..noise import initial_noise
from ..refine import Denoiser, RenoiseSigma
from ..solvers import SAMPLERS

def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter (the CPU for parameter-less callables)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def check_type(value: Any, expected: type | tuple[type, ...], name: str) -> None:
    """``TypeError`` naming the argument ``name`` unless ``value`` is an ``expected`` instance."""
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        shown = f" {value!r}" if isinstance(value, (str, numbers.Number)) else ""
        raise TypeError(f"{name} must be a {names}, got {type(value).__name__}{shown}")


def check_seeds(seeds: Any) -> list[int]:
    """``seeds`` as a list of ints, one per image (Python or NumPy ints); errors name ``seeds``.

    A single int is refused (``[seed]`` samples one image): a batch takes one seed per image.
    """
    if _index(seeds) is not None:
        raise TypeError(f"seeds must be a sequence of ints, one per image, got the int {seeds!r} "
                        f"(pass [{seeds!r}] for one image)")
    out = _ints(seeds, "seeds", "a sequence of ints, one per image")
    if not out:
        raise ValueError("seeds must name at least one image")
    for j, seed in enumerate(out):
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ValueError(f"seeds[{j}] = {seed} is out of torch.Generator's range [-2**63, 2**64)")
    return out


#: the text-embedding fields both families' conditioning share: (name, ndim, shape)
EMBEDDINGS = (("prompt_embeds", 3, "[batch, tokens, dim]"), ("negative_prompt_embeds", 3, "[batch, tokens, dim]"),
              ("pooled_prompt_embeds", 2, "[batch, dim]"), ("negative_pooled_prompt_embeds", 2, "[batch, dim]"))


def check_embeddings(conditioning: Any, hint: str, negatives_optional: bool = False) -> None:
    """Shape checks of a conditioning dataclass with the :data:`EMBEDDINGS` fields; errors name the field and ``hint``.

    Token embeddings ``[B, L, D]``, pooled ones ``[B, P]``, negatives shaped as the prompts (both
    absent allowed with ``negatives_optional``), one batch size.
    """
    cls = type(conditioning).__name__
    negatives = ("negative_prompt_embeds", "negative_pooled_prompt_embeds")
    for name, ndim, what in EMBEDDINGS:
        value = getattr(conditioning, name)
        if value is None and negatives_optional and name in negatives:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{cls}.{name} must be a tensor {what}, got {type(value).__name__} ({hint})")
        if value.ndim != ndim:
            raise ValueError(f"{cls}.{name} must be {what}, got shape {tuple(value.shape)} ({hint})")
    present = [getattr(conditioning, name) is not None for name in negatives]
    if any(present) and not all(present):
        raise ValueError(f"{cls} needs both negative_prompt_embeds and negative_pooled_prompt_embeds, or neither")
    if all(present):
        for neg, pos in zip(negatives, ("prompt_embeds", "pooled_prompt_embeds")):
            if getattr(conditioning, neg).shape != getattr(conditioning, pos).shape:
                raise ValueError(f"{cls}.{neg} has shape {tuple(getattr(conditioning, neg).shape)}, "
                                 f"{pos} {tuple(getattr(conditioning, pos).shape)}; they must match ({hint})")
    if conditioning.pooled_prompt_embeds.shape[0] != conditioning.prompt_embeds.shape[0]:
        raise ValueError(f"{cls}.pooled_prompt_embeds has batch {conditioning.pooled_prompt_embeds.shape[0]}, "
                         f"prompt_embeds {conditioning.prompt_embeds.shape[0]}")


def check_image_size(height: Any, width: Any, multiple: int, why: str) -> None:
    """``height`` and ``width`` must be positive ints and multiples of ``multiple`` (``why`` says whose rule)."""
    for name, size in (("height", height), ("width", width)):
        if _index(size) is None:
            raise TypeError(f"{name} must be an int (pixels), got {size!r}")
        if size <= 0 or size % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} ({why}), got {size}")


def check_vae(vae: Any, latent_channels: int, models: str) -> None:
    """Refuse a VAE whose ``config.latent_channels`` is not the models' latent channel count."""
    channels = getattr(getattr(vae, "config", None), "latent_channels", None)
    if channels is None or not callable(getattr(vae, "decode", None)):
        raise TypeError(f"vae must be a diffusers VAE (with decode and config.latent_channels), got {type(vae).__name__}")
    if channels != latent_channels:
        raise ValueError(f"vae has {channels} latent channels, {models} {latent_channels}: "
                         "the VAE must be the one of the models' latent space")


def calls_teacher(preset: Any, lam: Any, k: int | None, guided_steps: Sequence[int] | None) -> bool:
    """Whether a run may call the teacher: some step guided (``guided_steps``, else ``k``, else the
    preset's ``k``) with a ``lam`` (else the preset's) that is not 0."""
    lam = preset.lam if lam is None else lam
    guided = bool(list(guided_steps)) if guided_steps is not None else bool(preset.k if k is None else k)
    return guided and not (isinstance(lam, numbers.Real) and lam == 0)


def sample_batch(
    student: Denoiser, teacher: Denoiser, preset: Any, seeds: Sequence[int], shape: Sequence[int], *,
    sigmas: Tensor, noise_scale: float, lam: float | None, k: int | None, renoise: str | None, dtype: torch.dtype,
    device: torch.device | str, extra_args: Mapping[str, Any], teacher_extra_args: Mapping[str, Any],
    disable: bool | None = None, callback: Callable[[dict], Any] | None = None, guided_steps: Sequence[int] | None = None,
    renoise_sigma: RenoiseSigma = None,
) -> Tensor:
    """Sample one latent per seed with ``preset``'s kdpp sampler; returns ``[len(seeds), *shape]``.

    Image ``b`` starts from ``noise_scale * randn(shape)`` drawn on the CPU by
    ``torch.Generator().manual_seed(seeds[b])`` (so images reproduce across devices and batch
    sizes); its solver noise, renoise noise and random levels are the seed's streams
    (:mod:`kdpp.noise`). ``lam``, ``k`` and ``renoise`` default to the preset's;
    ``guided_steps`` (step indices, negative ones from the end) replaces ``k`` and is passed on
    only when given, as is ``renoise_sigma``. The sampler warns when a guided step can call no
    teacher (its renoise level is 0).
    """
    seeds = check_seeds(seeds)
    lam = preset.lam if lam is None else lam
    renoise = preset.renoise if renoise is None else renoise
    options: dict[str, Any] = {}
    if guided_steps is not None:
        options["guided_steps"] = list(guided_steps)
    elif k is None:
        k = preset.k
    if renoise_sigma is not None:
        options["renoise_sigma"] = renoise_sigma
    x = (initial_noise(seeds, (len(seeds), *shape)) * noise_scale).to(device=device, dtype=dtype)
    sampler = SAMPLERS[preset.sampler]
    with torch.no_grad():
        return sampler(
            student, teacher, x, sigmas, lam, k, extra_args=extra_args, teacher_extra_args=teacher_extra_args,
            renoise=renoise, seed=seeds, disable=disable, callback=callback,
            **options)


def to_pil(images: Tensor) -> list:
    """Decoded images in ``[-1, 1]``, ``[B, C, H, W]``, as a list of PIL images."""
    from PIL import Image

    arrays = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in arrays]


def unscale_latents(vae: Any, latents: Tensor) -> Tensor:
    """The VAE's latents from the model's, as diffusers' pipelines unscale them before ``vae.decode``.

    ``latents * latents_std / scaling_factor + latents_mean`` where the config has
    ``latents_mean`` and ``latents_std`` (per channel; the SDXL pipeline), else
    ``latents / scaling_factor + shift_factor`` (no shift where the VAE has none: SD/SDXL's).
    """
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        per_channel = (1, -1) + (1,) * (latents.ndim - 2)
        mean, std = (torch.tensor(v).view(per_channel).to(latents.device, latents.dtype) for v in (mean, std))
        return latents * std / config.scaling_factor + mean
    return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)


def decode(vae: Any, latents: Tensor) -> list:
    """Latents as PIL images through ``vae``, as diffusers' SDXL pipeline decodes them.

    The latents are unscaled (:func:`unscale_latents`) and decoded in the VAE's dtype, except
    that a float16 VAE whose ``config.force_upcast`` is set (SDXL's VAE overflows in float16) is
    cast to float32 for the decode and back to float16 afterwards, as the pipeline does.
    """
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    with torch.no_grad():
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            z = latents.to(device=getattr(vae, "device", latents.device), dtype=vae.dtype)
            images = vae.decode(unscale_latents(vae, z), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)
    return to_pil(images)
