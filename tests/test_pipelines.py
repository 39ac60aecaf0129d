"""The Distillation++ pipelines against the diffusers pipelines they wrap, on tiny components (random weights).

The references are diffusers' own pipelines (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline,
WanPipeline) built from the same components: diffusers' and transformers' test configurations with real tokenizers
and text encoders (tests/tiny_diffusers.py), an 8x AutoencoderKL (the families' VAE factor) and the Wan VAE. Where a
student's preset samples with another scheduler than the pipeline's default, the reference is the pipeline with the
matching scheduler swapped in, as a diffusers user of that student does.
"""
import inspect

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
pytest.importorskip("transformers", reason="the reference pipelines' text encoders need transformers")
pytest.importorskip("peft", reason="the LoRA students need peft")
from PIL import Image  # noqa: E402
from tiny_diffusers import (add_lora, tiny_flux, tiny_flux_text_pipeline, tiny_sd3, tiny_sd3_text_pipeline,  # noqa: E402
                            tiny_sdxl_text_pipeline, tiny_unet, tiny_wan, tiny_wan_text_pipeline, tiny_wan_vae)

from kdpp.diffusers import flow_presets  # noqa: E402
from kdpp.diffusers.lora import SharedLoRAModel  # noqa: E402
from kdpp.diffusers.pipelines import (FluxDistPPPipeline, StableDiffusion3DistPPPipeline,  # noqa: E402
                                      StableDiffusionXLDistPPPipeline, WanDistPPPipeline)
from kdpp.diffusers.pipelines.base import generator_seeds  # noqa: E402


def tiny_vae(scaling_factor, shift_factor=None, seed=0):
    """An AutoencoderKL with 4 blocks (8x, the families' factor) and 4 latent channels, random weights."""
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                   block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                   sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor).eval()


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gens(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a), torch.as_tensor(
        np.asarray(b) if not isinstance(b, torch.Tensor) else b)
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


class Calls:
    """Counts a module's forward calls (and whether its first PEFT layer had its adapters disabled)."""

    def __init__(self, module):
        self.disabled = []
        self.layer = next((m for m in module.modules() if hasattr(m, "_disable_adapters")), None)
        self.handle = module.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.disabled.append(self.layer is not None and bool(self.layer._disable_adapters))

    @property
    def count(self):
        return len(self.disabled)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------ the families' tiny pipelines

FLUX_SCHNELL, FLUX_DEV = tiny_flux(0), tiny_flux(1, guidance_embeds=True)
FLUX_PIPE = quiet(diffusers.FluxPipeline(**{**tiny_flux_text_pipeline(FLUX_SCHNELL).components,
                                            "vae": tiny_vae(1.5035, 0.0609)}))
FLUX_DEV_PIPE = quiet(diffusers.FluxPipeline(**{**FLUX_PIPE.components, "transformer": FLUX_DEV}))
FLUX_ARGS = dict(prompt=["a red fox", "a cat"], height=32, width=32, max_sequence_length=16)

SD3_TURBO, SD3_LARGE = tiny_sd3(0), tiny_sd3(1)
SD3_PIPE = quiet(diffusers.StableDiffusion3Pipeline(**{
    **tiny_sd3_text_pipeline(SD3_TURBO).components, "vae": tiny_vae(1.5305, 0.0609),
    "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(**flow_presets.SD35_SCHEDULER)}))
SD3_ARGS = dict(prompt=["a red fox", "a cat"], height=32, width=32, max_sequence_length=16)

SDXL_STUDENT, SDXL_BASE = tiny_unet(0), tiny_unet(1)
SDXL_PIPE = quiet(diffusers.StableDiffusionXLPipeline(**{
    **tiny_sdxl_text_pipeline().components, "unet": SDXL_STUDENT, "vae": tiny_vae(0.13025),
    "scheduler": diffusers.EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                                  timestep_spacing="trailing")}, add_watermarker=False))
SDXL_ARGS = dict(prompt=["a red fox", "a cat"], height=64, width=64)

WAN_LORA = add_lora(tiny_wan(0), "lightx2v", seed=3)
WAN_PIPE = quiet(tiny_wan_text_pipeline(WAN_LORA, vae=tiny_wan_vae()))
WAN_ARGS = dict(prompt=["a fox runs", "a cat"], height=32, width=32, num_frames=5, max_sequence_length=16)


# ------------------------------------------------------------------ lam = 0 is the diffusers pipeline


@pytest.mark.parametrize("output_type", ["latent", "np"])
def test_flux_schnell_at_lam0_is_flux_pipeline(output_type):
    """FLUX.1-schnell's preset (Euler, no shift) is FluxPipeline's own scheduler: images and packed latents equal."""
    kd = FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=FLUX_DEV_PIPE)
    want = FLUX_PIPE(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type=output_type).images
    with Calls(FLUX_DEV) as teacher:
        got = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type=output_type, lam=0).images
    assert teacher.count == 0
    assert type(got) is type(want) and got.shape == want.shape  # packed [B, (h/2)(w/2), 4C] for "latent"
    assert rel(got, want) < 1e-5


def test_flux_dev_lora_student_at_lam0_is_flux_pipeline_with_the_lora():
    """A step-distilled FLUX.1-dev LoRA (the "flux.1-dev-lora" preset: FLUX.1-dev's dynamic-shift scheduler, guidance
    3.5) with the teacher the same transformer, adapters off: lam = 0 is FluxPipeline with the LoRA active."""
    lora = add_lora(tiny_flux(2, guidance_embeds=True), "turbo", seed=5)
    pipe = quiet(diffusers.FluxPipeline(**{**FLUX_PIPE.components, "transformer": lora, "scheduler":
                                           diffusers.FlowMatchEulerDiscreteScheduler(**flow_presets.FLUX_DEV_SCHEDULER)}))
    kd = FluxDistPPPipeline.from_pipe(pipe, teacher=SharedLoRAModel(lora), student="flux.1-dev-lora")
    want = pipe(**FLUX_ARGS, num_inference_steps=3, guidance_scale=3.5, generator=gens(1, 2), output_type="latent").images
    with Calls(lora) as calls:
        got = kd(**FLUX_ARGS, num_inference_steps=3, generator=gens(1, 2), output_type="latent", lam=0).images
    assert rel(got, want) < 1e-5 and calls.disabled == [False] * 3
    with Calls(lora) as calls:
        guided = kd(**FLUX_ARGS, num_inference_steps=3, generator=gens(1, 2), output_type="latent", lam=0.5).images
    assert calls.disabled == [False, True, False, False]  # the teacher (adapters off) once, after the first step
    assert rel(guided, want) > 1e-3


@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_sd35_turbo_at_lam0_is_sd3_pipeline(guidance_scale):
    """SD3.5 Large Turbo's preset (Euler, shift 3) on the pipeline's scheduler, without CFG (the recipe's guidance 0)
    and with the student's own CFG (guidance_scale 2 with a negative prompt, as the pipeline batches it)."""
    kd = StableDiffusion3DistPPPipeline.from_pipe(SD3_PIPE, teacher=SD3_LARGE)
    args = dict(SD3_ARGS, negative_prompt=["blurry", "dark"], guidance_scale=guidance_scale, num_inference_steps=3)
    for output_type in ("latent", "np"):
        want = SD3_PIPE(**args, generator=gens(3, 4), output_type=output_type).images
        got = kd(**args, generator=gens(3, 4), output_type=output_type, lam=0).images
        assert got.shape == want.shape and rel(got, want) < 1e-5, output_type


def test_sdxl_lightning_at_lam0_is_sdxl_pipeline_with_trailing_euler():
    """SDXL-Lightning's preset (Euler at trailing timesteps) is StableDiffusionXLPipeline with
    EulerDiscreteScheduler(timestep_spacing="trailing") and guidance_scale 0, as its model card runs it."""
    kd = StableDiffusionXLDistPPPipeline.from_pipe(SDXL_PIPE, teacher=SDXL_BASE, student="sdxl-lightning")
    for output_type in ("latent", "np"):
        want = SDXL_PIPE(**SDXL_ARGS, num_inference_steps=4, guidance_scale=0.0, generator=gens(5, 6),
                         output_type=output_type).images
        got = kd(**SDXL_ARGS, num_inference_steps=4, guidance_scale=0.0, generator=gens(5, 6), output_type=output_type,
                 lam=0).images
        assert got.shape == want.shape and rel(got, want) < 1e-5, output_type


def test_wan_base_with_cfg_at_lam0_is_wan_pipeline():
    """A Wan student sampled with WanPipeline's own CFG (guidance_scale 5: one batched call, the pipeline's two)
    and a deterministic Euler preset is WanPipeline with FlowMatchEulerDiscreteScheduler(shift=5)."""
    import dataclasses

    base = tiny_wan(4)
    pipe = quiet(diffusers.WanPipeline(**{**WAN_PIPE.components, "transformer": base,
                                          "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)}))
    preset = dataclasses.replace(flow_presets.wan21_lightx2v(3), sampler="euler", schedule="pipeline",
                                 scheduler_config={"num_train_timesteps": 1000, "shift": 5.0})
    kd = WanDistPPPipeline.from_pipe(pipe, student=preset)
    args = dict(WAN_ARGS, negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=3)
    for output_type in ("latent", "np"):
        want = pipe(**args, generator=gens(7, 8), output_type=output_type).frames
        got = kd(**args, generator=gens(7, 8), output_type=output_type, lam=0).frames
        assert got.shape == want.shape and rel(got, want) < 1e-5, output_type
