"""SD3 / SD3.5 students with an SD3.5 teacher: SD3.5 Large Turbo guided by SD3.5 Large (true CFG).

:class:`SD3Family` is the SD3 side of the one generation body (:func:`kdpp.diffusers.sampling.sample`).

:class:`SD3Velocity` does what ``StableDiffusion3Pipeline`` does around ``SD3Transformer2DModel``:
latents ``[B, 16, H/8, W/8]`` (the transformer patchifies them itself), ``timestep = 1000 t``
(``num_train_timesteps t``), ``encoder_hidden_states`` and ``pooled_projections`` from the
embeddings, and the scheduler's static shift (or its dynamic shift over ``(h/p)(w/p)`` image
tokens, where a config asks for one). True CFG (the SD3.5 Large teacher) is one batched call of
``[uncond, cond]`` (:class:`kdpp.CFGDenoiser`), as the pipeline batches it.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from . import sampling
from .flow_models import FlowConditioning, FlowFamily, FlowTransformer
from .flow_presets import FlowStudentPreset, sd35_large_turbo
from .sampling import check_image_size


class SD3Velocity(FlowTransformer):
    """An ``SD3Transformer2DModel`` as a rectified-flow velocity model ``v(x_rf, t, encoder_hidden_states, pooled_projections)``."""

    family = "sd3"
    config_key = "pos_embed_max_size"
    pipeline = "StableDiffusion3Pipeline (SD3Transformer2DModel)"

    def __init__(self, transformer: Any, name: str = "transformer", guidance: float | None = None,
                 num_train_timesteps: int = 1000):
        super().__init__(transformer, name, guidance)
        self.timestep_scale = float(num_train_timesteps)
        self.patch_size = int(self.config["patch_size"])

    @property
    def latent_channels(self) -> int:
        return int(self.config["in_channels"])

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        check_image_size(height, width, 8 * self.patch_size, f"SD3: 8x VAE, patch size {self.patch_size}")
        return self.latent_channels, height // 8, width // 8

    def image_seq_len(self, shape: Sequence[int]) -> int:
        return (shape[-2] // self.patch_size) * (shape[-1] // self.patch_size)

    def check_latents(self, x: Tensor) -> None:
        super().check_latents(x)
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f"{self.name} takes latents whose height and width are multiples of its patch size "
                             f"{self.patch_size}, got shape {tuple(x.shape)}")

    def forward(self, x_rf: Tensor, timestep: Tensor, kwargs: dict[str, Any]) -> Tensor:
        return self.call(hidden_states=x_rf, timestep=timestep, return_dict=False, **kwargs)[0]


class SD3Family(FlowFamily):
    """SD3 transformers (student, teacher) bound to a batch's conditioning and image size (:class:`FlowFamily`'s arguments)."""

    name = "sd3"
    velocity = SD3Velocity
    default_preset = staticmethod(sd35_large_turbo)


def generate(student_transformer: Any, teacher_transformer: Any, conditioning: FlowConditioning,
             preset: FlowStudentPreset | None = None, **options: Any) -> Any:
    """Sample a batch with an SD3 student (default: SD3.5 Large Turbo, 4 steps) and the SD3.5 Large teacher.

    ``conditioning`` holds ``StableDiffusion3Pipeline.encode_prompt``'s four tensors, in its order:
    ``FlowConditioning(*pipe.encode_prompt(...))`` (the negative ones feed the teacher's CFG). The
    family options (``teacher``, ``teacher_conditioning``, ``scheduler_config``, ``height``, ``width``,
    ``device``, ``attention_kwargs``) are :class:`kdpp.diffusers.flow_models.FlowFamily`'s; the
    sampling options (``seeds``, ``lam``, ``k``, ``vae``, ...) those of :func:`kdpp.diffusers.sampling.generate`.
    """
    return sampling.generate(SD3Family, student_transformer, teacher_transformer, conditioning, preset, **options)
