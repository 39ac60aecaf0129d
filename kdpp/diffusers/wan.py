"""Wan 2.1 text-to-video: a step-distilled LoRA student guided by its own base model (CFG), on 5-D latents.

:class:`WanVelocity` does what ``WanPipeline`` does around ``WanTransformer3DModel``: the sampler
runs on the VAE latent video ``[B, 16, F, H/8, W/8]`` with ``F = (num_frames - 1) / 4 + 1`` (the
VAE compresses 4 frames into one after the first), the transformer patchifies it itself and is
called with ``timestep = 1000 t`` (``num_train_timesteps t``), the UMT5 ``encoder_hidden_states``
and its ``attention_kwargs``; it predicts the flow velocity. The teacher's CFG is one batched call
of ``[negative, positive]`` (the pipeline makes two calls; the same CFG up to rounding), two calls
where the negative and positive embeddings differ in token count.
:class:`WanFamily` is the Wan side of the one generation body (:func:`kdpp.diffusers.sampling.sample`);
its default preset is lightx2v's 4-step LoRA recipe
(:func:`kdpp.diffusers.flow_presets.wan21_lightx2v`), whose student and teacher are one transformer:
``pair = SharedLoRAModel(pipe.transformer)``, then ``generate(pair.student, pair.teacher, ...)``.
Decoding (``vae``) is the pipeline's: ``latents * latents_std + latents_mean`` per channel, the Wan
VAE, diffusers' ``VideoProcessor`` (a list of PIL frames per video).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from .._checks import _index
from . import sampling
from .flow_models import FlowFamily, FlowTransformer
from .flow_presets import FlowStudentPreset, wan21_lightx2v
from .sampling import check_embeddings, check_vae

#: WanPipeline's VAE factors (AutoencoderKLWan: scale_factor_temporal 4, scale_factor_spatial 8)
TEMPORAL, SPATIAL = 4, 8
_FIELDS = (("prompt_embeds", 3, "[batch, tokens, dim]"), ("negative_prompt_embeds", 3, "[batch, tokens, dim]"))


@dataclass
class WanConditioning:
    """Wan text conditioning for a batch, in the order ``WanPipeline.encode_prompt`` returns it.

    ``WanConditioning(*pipe.encode_prompt(prompts, negative_prompts))`` holds ``(prompt_embeds,
    negative_prompt_embeds)`` (UMT5 embeddings ``[B, 512, 4096]``, zero-padded after each prompt's
    tokens, as the pipeline pads them). The negative embeddings are needed only where CFG is used
    (the Wan teacher) and the teacher is called. Their token count may differ from the prompt's
    (``WanPipeline`` runs its two CFG passes separately, so it takes e.g. ``prompt_embeds`` of 32
    tokens with a negative prompt encoded to 512): CFG is then two calls instead of one batched
    call. Shapes are checked on construction.
    """

    prompt_embeds: Tensor
    negative_prompt_embeds: Tensor | None = None

    def __post_init__(self):
        check_embeddings(self, "in WanPipeline.encode_prompt's order: prompt_embeds, negative_prompt_embeds",
                         _FIELDS, negatives_optional=True, tokens_may_differ=True)

    @property
    def batch(self) -> int:
        return self.prompt_embeds.shape[0]

    @property
    def has_negative(self) -> bool:
        return self.negative_prompt_embeds is not None

    def kwargs(self, negative: bool = False, *, device: Any = None, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        """The transformer's ``encoder_hidden_states`` (the negative prompt's with ``negative``)."""
        emb = self.negative_prompt_embeds if negative else self.prompt_embeds
        return {"encoder_hidden_states": emb.to(device=device, dtype=dtype)}

    def check_batch(self, batch: int, name: str) -> None:
        if self.batch != batch:
            raise ValueError(f"{name}.prompt_embeds has batch {self.batch}, seeds has {batch}")


class WanVelocity(FlowTransformer):
    """A ``WanTransformer3DModel`` as a rectified-flow velocity model on latent videos ``[B, C, F, h, w]``."""

    family = "wan"
    config_key = "rope_max_seq_len"
    pipeline = "WanPipeline (WanTransformer3DModel)"
    attention_key = "attention_kwargs"

    def __init__(self, transformer: Any, name: str = "transformer", guidance: float | None = None,
                 num_train_timesteps: int = 1000):
        super().__init__(transformer, name, guidance)
        self.timestep_scale = float(num_train_timesteps)
        self.patch_size = tuple(int(p) for p in self.config["patch_size"])

    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"])

    def latent_shape(self, height: int, width: int, num_frames: int) -> tuple[int, int, int, int]:
        """``(C, F, h, w)`` of ``num_frames`` frames of ``height x width``; refuses what the VAE and patching cannot take."""
        _, ph, pw = self.patch_size
        for name, size, patch in (("height", height, ph), ("width", width, pw)):
            if _index(size) is None:
                raise TypeError(f"{name} must be an int (pixels), got {size!r}")
            if size <= 0 or size % (SPATIAL * patch):
                raise ValueError(f"{name} must be a positive multiple of {SPATIAL * patch} (Wan: 8x VAE, patch size "
                                 f"{patch}; WanPipeline refuses other sizes too), got {size}")
        if _index(num_frames) is None:
            raise TypeError(f"num_frames must be an int, got {num_frames!r}")
        if num_frames < 1 or (num_frames - 1) % TEMPORAL:
            raise ValueError(f"num_frames must be 4 n + 1 (the Wan VAE keeps the first frame and compresses each 4 "
                             f"after it into one latent frame; WanPipeline rounds other counts), got {num_frames}")
        return self.latent_channels, (num_frames - 1) // TEMPORAL + 1, height // SPATIAL, width // SPATIAL

    def image_seq_len(self, shape: Sequence[int]) -> int:
        pt, ph, pw = self.patch_size
        return (shape[-3] // pt) * (shape[-2] // ph) * (shape[-1] // pw)

    def check_conditioning(self, conditioning: Any, name: str) -> None:
        width, got = self.config.get("text_dim"), conditioning.prompt_embeds.shape[-1]
        if isinstance(width, int) and got != width:
            raise ValueError(f"{name}.prompt_embeds has width {got}, {self.name} takes {width} (its config.text_dim): "
                             "the embeddings must come from this model's text encoder")

    def check_latents(self, x: Tensor, ndim: int = 5, layout: str = "[B, {c}, F, h, w]") -> None:
        super().check_latents(x, ndim, layout)
        pt, ph, pw = self.patch_size
        if x.shape[2] % pt or x.shape[3] % ph or x.shape[4] % pw:
            raise ValueError(f"{self.name} patchifies latents into {self.patch_size} patches: frames, height and width "
                             f"must be multiples of them, got shape {tuple(x.shape)}")

    def forward(self, x_rf: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        return self.call(hidden_states=x_rf, timestep=timestep, return_dict=False, **kwargs)[0]


class WanFamily(FlowFamily):
    """Wan transformers (student, teacher) bound to a batch's conditioning and video size.

    :class:`kdpp.diffusers.flow_models.FlowFamily`'s arguments, with the video's ``height`` and
    ``width`` (multiples of 16, WanPipeline's defaults 480 x 832) and ``num_frames`` (``4 n + 1``,
    default 81); ``conditioning`` is a :class:`WanConditioning`.
    """

    name = "wan"
    velocity = WanVelocity
    conditioning_type = WanConditioning
    default_preset = staticmethod(wan21_lightx2v)

    def __init__(self, student_transformer: Any, teacher_transformer: Any, conditioning: WanConditioning,
                 preset: FlowStudentPreset | None = None, *, height: int = 480, width: int = 832, num_frames: int = 81,
                 **options: Any):
        self.num_frames = num_frames
        super().__init__(student_transformer, teacher_transformer, conditioning, preset, height=height, width=width,
                         **options)

    def latent_shape(self, adapter: FlowTransformer) -> tuple[int, ...]:
        return adapter.latent_shape(self.height, self.width, self.num_frames)

    def check_vae(self, vae: Any) -> None:
        check_vae(vae, self.shape[0], "the transformers take", key="z_dim")
        config = vae.config
        factors = (getattr(config, "scale_factor_temporal", TEMPORAL), getattr(config, "scale_factor_spatial", SPATIAL))
        if factors != (TEMPORAL, SPATIAL):
            raise ValueError(f"vae compresses {factors[0]} frames and {factors[1]}x{factors[1]} pixels per latent; "
                             f"kdpp's Wan family follows Wan 2.1's VAE ({TEMPORAL}, {SPATIAL})")

    def decode(self, vae: Any, latents: Tensor) -> list:
        """Latent videos as lists of PIL frames, as ``WanPipeline`` decodes them (``output_type="pil"``)."""
        from diffusers.video_processor import VideoProcessor

        video = sampling.vae_decode(vae, latents)
        return VideoProcessor(vae_scale_factor=SPATIAL).postprocess_video(video, output_type="pil")


def generate(student_transformer: Any, teacher_transformer: Any, conditioning: WanConditioning,
             preset: FlowStudentPreset | None = None, **options: Any) -> Any:
    """Sample a batch of videos with a Wan student (default: the lightx2v 4-step LoRA recipe) and the Wan teacher.

    ``conditioning`` is ``WanConditioning(*pipe.encode_prompt(prompts, negative_prompts))`` (the
    negative embeddings feed the teacher's CFG). For a LoRA student on the teacher's own
    transformer: ``pair = SharedLoRAModel(pipe.transformer)``, ``generate(pair.student, pair.teacher,
    ...)``. The family options (``height``, ``width``, ``num_frames``, ``teacher``,
    ``teacher_conditioning``, ``scheduler_config``, ``device``, ``attention_kwargs``) are
    :class:`WanFamily`'s; the sampling options (``seeds``, ``lam``, ``k``, ``vae``, ...) those of
    :func:`kdpp.diffusers.sampling.generate`. Returns latents ``[B, C, F, h, w]`` (float32) or, with
    ``vae``, one list of PIL frames per video.
    """
    return sampling.generate(WanFamily, student_transformer, teacher_transformer, conditioning, preset, **options)
