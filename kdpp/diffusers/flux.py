"""FLUX students with the FLUX.1-dev teacher: FLUX.1-schnell (or a step-distilled FLUX.1-dev LoRA).

:class:`FluxVelocity` does what ``FluxPipeline`` does around ``FluxTransformer2DModel``: the
sampler runs on the VAE latent ``[B, 16, H/8, W/8]`` and every call packs it into 2x2 patches
(``[B, (h/2)(w/2), 64]``) with image position ids ``(0, row, col)`` and zero text ids, and
unpacks the velocity; ``timestep = t``; the distilled guidance of FLUX.1-dev goes through its
guidance embedding (``guidance``, one forward per call; FLUX.1-schnell has none). The schedule is
the scheduler's: FLUX.1-schnell's static shift 1, FLUX.1-dev's dynamic shift over the
``(h/2)(w/2)`` image tokens, from ``sigmas = linspace(1, 1/N, N)`` as the pipeline passes them. :class:`FluxFamily` is the FLUX side
of the one generation body (:func:`kdpp.diffusers.sampling.sample`).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from . import sampling
from .flow_models import FlowConditioning, FlowFamily, FlowTransformer
from .flow_presets import FlowStudentPreset, flux_schnell
from .sampling import check_image_size


def pack_latents(latents: Tensor) -> Tensor:
    """``[B, C, h, w]`` as FLUX's sequence of 2x2 patches ``[B, (h/2)(w/2), 4C]`` (row-major patches, channel-major features)."""
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack_latents`: ``[B, (h/2)(w/2), 4C]`` back to ``[B, C, h, w]``."""
    b, _, features = packed.shape
    patches = packed.reshape(b, h // 2, w // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, features // 4, h, w)


def latent_image_ids(h: int, w: int, device: Any = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """FLUX's image position ids for an ``h x w`` grid of patches: ``[h w, 3]`` rows ``(0, row, col)``."""
    ids = torch.zeros(h, w, 3, device=device, dtype=dtype)  # built where it is used: no copy per model call
    ids[..., 1] = torch.arange(h, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w, device=device, dtype=dtype)[None, :]
    return ids.reshape(h * w, 3)


class FluxVelocity(FlowTransformer):
    """A ``FluxTransformer2DModel`` as a rectified-flow velocity model on unpacked latents ``[B, C, h, w]``."""

    family = "flux"
    config_key = "axes_dims_rope"
    pipeline = "FluxPipeline (FluxTransformer2DModel)"

    def __init__(self, transformer: Any, name: str = "transformer", guidance: float | None = None,
                 num_train_timesteps: int = 1000):
        super().__init__(transformer, name, guidance)
        self.timestep_scale = num_train_timesteps / 1000  # the pipeline passes scheduler timesteps / 1000
        if self.config["in_channels"] % 4:
            raise ValueError(f"{name} takes {self.config['in_channels']} packed channels, not 4 x latent channels")

    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"]) // 4

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        check_image_size(height, width, 16, "FLUX: 8x VAE, 2x2 latent packing")
        return self.latent_channels, height // 8, width // 8

    def image_seq_len(self, shape: Sequence[int]) -> int:
        return (shape[-2] // 2) * (shape[-1] // 2)

    def default_sigmas(self, steps: int, scheduler_config: Mapping[str, Any]) -> Sequence[float] | None:
        return None if scheduler_config.get("use_flow_sigmas") else np.linspace(1.0, 1 / steps, steps)

    def check_latents(self, x: Tensor) -> None:
        super().check_latents(x)
        if x.shape[2] % 2 or x.shape[3] % 2:
            raise ValueError(f"{self.name} packs latents into 2x2 patches: height and width must be even, "
                             f"got shape {tuple(x.shape)}")

    def forward(self, x_rf: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        b, _, h, w = x_rf.shape
        text = kwargs["encoder_hidden_states"]
        guidance = None if self.guidance is None else torch.full((b,), float(self.guidance), device=x_rf.device)
        out = self.call(
            hidden_states=pack_latents(x_rf), timestep=timestep, guidance=guidance,
            img_ids=latent_image_ids(h // 2, w // 2, x_rf.device, x_rf.dtype),
            txt_ids=torch.zeros(text.shape[1], 3, device=x_rf.device, dtype=x_rf.dtype),
            return_dict=False, **kwargs)[0]
        return unpack_latents(out, h, w)


class FluxFamily(FlowFamily):
    """FLUX transformers (student, teacher) bound to a batch's conditioning and image size (:class:`FlowFamily`'s arguments)."""

    name = "flux"
    velocity = FluxVelocity
    default_preset = staticmethod(flux_schnell)


def generate(student_transformer: Any, teacher_transformer: Any, conditioning: FlowConditioning,
             preset: FlowStudentPreset | None = None, **options: Any) -> Any:
    """Sample a batch with a FLUX student (default: FLUX.1-schnell, 4 steps) and the FLUX.1-dev teacher.

    ``conditioning`` holds ``FluxPipeline.encode_prompt``'s ``prompt_embeds`` and
    ``pooled_prompt_embeds``: ``FlowConditioning.from_flux(*pipe.encode_prompt(...))`` (pass
    ``teacher_conditioning`` for the teacher's 512-token T5 embeddings when the student's are 256).
    The family options (``teacher``, ``teacher_conditioning``, ``scheduler_config``, ``height``,
    ``width``, ``device``, ``attention_kwargs``) are :class:`kdpp.diffusers.flow_models.FlowFamily`'s;
    the sampling options (``seeds``, ``lam``, ``k``, ``vae``, ...) those of
    :func:`kdpp.diffusers.sampling.generate`. Returns unpacked latents ``[B, C, h, w]`` (float32) or
    PIL images with ``vae``.
    """
    return sampling.generate(FluxFamily, student_transformer, teacher_transformer, conditioning, preset, **options)
