"""The Distillation++ pipelines against the diffusers pipelines they wrap, on tiny components (random weights).

The references are diffusers' own pipelines (FluxPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline,
WanPipeline) built from the same components: diffusers' and transformers' test configurations with real tokenizers
and text encoders (tests/tiny_diffusers.py), an 8x AutoencoderKL (the families' VAE factor) and the Wan VAE. Where a
student's preset samples with another scheduler than the pipeline's default, the reference is the pipeline with the
matching scheduler swapped in, as a diffusers user of that student does.
"""
import inspect
import re

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
pytest.importorskip("transformers", reason="the reference pipelines' text encoders need transformers")
pytest.importorskip("peft", reason="the LoRA students need peft")
from PIL import Image  # noqa: E402
from tiny_diffusers import (add_lora, recipe_scheduler, tiny_flux, tiny_flux_text_pipeline, tiny_sd3,  # noqa: E402
                            tiny_sd3_text_pipeline, tiny_sdxl_text_pipeline, tiny_unet, tiny_wan, tiny_wan_text_pipeline,
                            tiny_wan_vae)

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


def test_wan_prompt_embeds_shorter_than_the_negative_prompts_are_taken_as_wan_pipeline_takes_them():
    """prompt_embeds of 16 tokens (encode_prompt's max_sequence_length=16) without negative_prompt_embeds: the negative
    prompt is encoded with the call's max_sequence_length (512), as WanPipeline does, and CFG runs its two passes
    separately: lam = 0 with the student's CFG equals WanPipeline; a guided run calls the teacher (CFG 5) twice a step."""
    import dataclasses

    base = tiny_wan(4)
    pipe = quiet(diffusers.WanPipeline(**{**WAN_PIPE.components, "transformer": base,
                                          "scheduler": diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0)}))
    preset = dataclasses.replace(flow_presets.wan21_lightx2v(3), sampler="euler", schedule="pipeline",
                                 scheduler_config={"num_train_timesteps": 1000, "shift": 5.0})
    embeds, _ = pipe.encode_prompt(WAN_ARGS["prompt"], do_classifier_free_guidance=False, max_sequence_length=16)
    args = dict(WAN_ARGS, prompt=None, prompt_embeds=embeds, guidance_scale=5.0, num_inference_steps=3,
                output_type="latent")
    del args["max_sequence_length"]
    want = pipe(**args, generator=gens(7, 8)).frames
    got = WanDistPPPipeline.from_pipe(pipe, student=preset)(**args, generator=gens(7, 8), lam=0).frames
    assert rel(got, want) < 1e-5
    make, teacher, _ = FAMILIES["wan"]
    guided_args = dict(args, guidance_scale=None, num_inference_steps=3)
    torch.manual_seed(0)
    plain = make()(**guided_args, generator=gens(1, 2), lam=0).frames
    torch.manual_seed(0)
    with Calls(teacher) as calls:
        guided = make()(**guided_args, generator=gens(1, 2), k=1).frames
    assert sum(calls.disabled) == 2 and rel(guided, plain) > 1e-3  # the teacher's cond and uncond passes


def test_flux_true_cfg_with_a_negative_prompt_of_another_token_count_is_flux_pipelines():
    """prompt_embeds of 16 tokens with a negative prompt encoded to the call's 32: FluxPipeline runs its true-CFG passes
    separately, and so does kdpp (lam = 0 equals it)."""
    embeds, pooled, _ = FLUX_PIPE.encode_prompt(FLUX_ARGS["prompt"], None, max_sequence_length=16)
    args = dict(FLUX_ARGS, prompt=None, prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt=["blurry"] * 2,
                true_cfg_scale=2.0, max_sequence_length=32, num_inference_steps=4, output_type="latent")
    want = FLUX_PIPE(**args, generator=gens(1, 2)).images
    got = FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=FLUX_DEV_PIPE)(**args, generator=gens(1, 2), lam=0).images
    assert rel(got, want) < 1e-5


# ------------------------------------------------------------------ callbacks and interrupt


class Edit:
    """A callback_on_step_end that records (i, t, latents), scales the latents after step 1 and interrupts after
    step ``stop`` (as diffusers' users write them)."""

    def __init__(self, stop=None):
        self.seen, self.stop = [], stop

    def __call__(self, pipe, i, t, kwargs):
        self.seen.append((i, float(t), kwargs["latents"].clone()))
        if i == self.stop:
            pipe._interrupt = True
        return {"latents": kwargs["latents"] * 0.9} if i == 1 else {}


@pytest.mark.parametrize("stop", [None, 2])
def test_callback_on_step_end_edits_latents_and_interrupts_as_in_flux_pipeline(stop):
    """callback_on_step_end sees FluxPipeline's packed latents and timesteps after each step, its latents edits
    change the rest of the run as in the pipeline, and pipe._interrupt stops the run where the pipeline stops."""
    kd = FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=FLUX_DEV)
    want_cb, got_cb = Edit(stop), Edit(stop)
    want = FLUX_PIPE(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent",
                     callback_on_step_end=want_cb).images
    got = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent", lam=0,
             callback_on_step_end=got_cb).images
    assert [i for i, _, _ in got_cb.seen] == [i for i, _, _ in want_cb.seen] == list(range(4 if stop is None else 3))
    for (_, t_got, x_got), (_, t_want, x_want) in zip(got_cb.seen, want_cb.seen):
        assert t_got == pytest.approx(t_want, rel=1e-6) and rel(x_got, x_want) < 1e-5
    assert rel(got, want) < 1e-5
    plain = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent", lam=0).images
    assert rel(got, plain) > 1e-2  # the edit (and the interrupt) changed the result


def test_callback_on_step_end_in_the_sdxl_frame_and_a_guided_run():
    """The SDXL pipeline's latents (Euler: the VE state) and integer timesteps reach the callback; in a guided run
    the teacher is still called on its step, and the callback's edits are the run's."""
    kd = StableDiffusionXLDistPPPipeline.from_pipe(SDXL_PIPE, teacher=SDXL_BASE, student="sdxl-lightning")
    want_cb, got_cb = Edit(), Edit()
    args = dict(SDXL_ARGS, num_inference_steps=4, guidance_scale=0.0, output_type="latent")
    want = SDXL_PIPE(**args, generator=gens(5, 6), callback_on_step_end=want_cb).images
    got = kd(**args, generator=gens(5, 6), lam=0, callback_on_step_end=got_cb).images
    assert [t for _, t, _ in got_cb.seen] == [t for _, t, _ in want_cb.seen] == [999.0, 749.0, 499.0, 249.0]
    assert rel(got, want) < 1e-5
    with Calls(SDXL_BASE) as teacher:
        guided = kd(**args, generator=gens(5, 6), lam=0.5, k=2, callback_on_step_end=Edit()).images
    with Calls(SDXL_BASE) as teacher_plain:
        unsplit = kd(**args, generator=gens(5, 6), lam=0.5, k=2).images
    assert teacher.count == teacher_plain.count == 2
    assert rel(guided, unsplit) > 1e-3  # the edit after step 1


def test_callback_may_read_the_conditioning_but_not_replace_it():
    kd = WanDistPPPipeline.from_pipe(WAN_PIPE, teacher=SharedLoRAModel(WAN_LORA))
    seen = []

    def read(pipe, i, t, kwargs):
        seen.append(sorted(kwargs))
        return kwargs

    kd(**WAN_ARGS, num_inference_steps=2, generator=gens(1, 2), output_type="latent", lam=0, callback_on_step_end=read,
       callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
    assert seen == [["latents", "prompt_embeds"]] * 2
    with pytest.raises(ValueError, match="callback_on_step_end returned a new 'prompt_embeds'"):
        kd(**WAN_ARGS, num_inference_steps=2, generator=gens(1, 2), output_type="latent", lam=0,
           callback_on_step_end=lambda pipe, i, t, kw: {"prompt_embeds": kw["prompt_embeds"] * 2},
           callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):  # the pipeline's own check_inputs
        kd(**WAN_ARGS, num_inference_steps=2, callback_on_step_end=read, callback_on_step_end_tensor_inputs=["noise"])


# ------------------------------------------------------------------ the teacher


def flux_kd():
    return FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=FLUX_DEV_PIPE)


FAMILIES = {  # name: (the Distillation++ pipeline, the teacher module its calls are counted on, call arguments)
    "flux": (flux_kd, FLUX_DEV, dict(FLUX_ARGS, num_inference_steps=4)),
    "sd3": (lambda: StableDiffusion3DistPPPipeline.from_pipe(SD3_PIPE, teacher=SD3_LARGE), SD3_LARGE,
            dict(SD3_ARGS, num_inference_steps=3)),
    "sdxl": (lambda: StableDiffusionXLDistPPPipeline.from_pipe(SDXL_PIPE, teacher=SDXL_BASE, student="sdxl-turbo"),
             SDXL_BASE, dict(SDXL_ARGS, num_inference_steps=2)),
    "wan": (lambda: WanDistPPPipeline.from_pipe(WAN_PIPE, teacher=SharedLoRAModel(WAN_LORA)), WAN_LORA,
            dict(WAN_ARGS, num_inference_steps=3)),
}


def teacher_calls(calls):
    """Teacher calls: every call of a separate teacher; the adapters-off calls of a LoRA pair's one model."""
    return sum(calls.disabled) if calls.layer is not None else calls.count


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_teacher_is_called_once_per_guided_step_and_never_at_lam0(family):
    make, teacher, args = FAMILIES[family]
    kd = make()
    outputs = {}
    for lam, k, guided_steps, want in [(0.0, None, None, 0), (0.5, 1, None, 1), (0.5, 0, None, 0), (0.5, None, [0, 1], 2)]:
        torch.manual_seed(0)  # WanPipeline's stochastic step draws from the global RNG (it passes no generator)
        with Calls(teacher) as calls:
            outputs[lam, k] = kd(**args, generator=gens(1, 2), output_type="latent", lam=lam, k=k,
                                 guided_steps=guided_steps, return_dict=False)[0]
        assert teacher_calls(calls) == want, (lam, k, guided_steps)
    assert rel(outputs[0.5, 1], outputs[0.0, None]) > 1e-3
    torch.testing.assert_close(outputs[0.5, 0], outputs[0.0, None])


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_guided_steps_not_a_sequence_gets_the_cores_error_and_an_iterator_is_read_once(family):
    make, teacher, args = FAMILIES[family]
    kd = make()
    with Calls(kd.components[kd._denoiser]) as calls:
        with pytest.raises(TypeError, match=r"^guided_steps must be a sequence of step indices, got 0$"):
            kd(**args, guided_steps=0, lam=0.5)
        with pytest.raises(TypeError, match=r"^guided_steps\[1\] must be an int, got 'x'$"):
            kd(**args, guided_steps=[0, "x"], lam=0.5)
    assert calls.count == 0
    with Calls(teacher) as calls:
        kd(**args, guided_steps=iter([0, 1]), lam=0.5, output_type="latent")
    assert teacher_calls(calls) == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_output_types_and_classes_are_the_pipelines(family):
    make, _, args = FAMILIES[family]
    kd = make()
    base = next(c for c in type(kd).__mro__[1:] if c.__module__.startswith("diffusers"))
    reference = {"flux": diffusers.FluxPipeline, "sd3": diffusers.StableDiffusion3Pipeline,
                 "sdxl": diffusers.StableDiffusionXLPipeline, "wan": diffusers.WanPipeline}[family]
    assert base is reference and isinstance(kd, reference)
    args = dict(args, num_inference_steps=1, lam=0)
    pil = kd(**args, output_type="pil")
    key = "frames" if family == "wan" else "images"
    assert type(pil).__module__ == inspect.getmodule(reference).__name__.rsplit(".", 1)[0] + ".pipeline_output"
    images = getattr(pil, key)
    if family == "wan":
        assert len(images) == 2 and all(len(video) == 5 and isinstance(video[0], Image.Image) for video in images)
    else:
        assert len(images) == 2 and all(isinstance(im, Image.Image) and im.size == (args["width"],) * 2 for im in images)
    assert isinstance(getattr(kd(**args, output_type="np"), key), np.ndarray)
    assert isinstance(getattr(kd(**args, output_type="pt"), key), torch.Tensor)
    out = kd(**args, output_type="latent", return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1 and out[0].dtype == kd.components[kd._denoiser].dtype
    with pytest.raises(ValueError, match="output_type must be one of"):
        kd(**args, output_type="jpeg")


# ------------------------------------------------------------------ the diffusers arguments

REFUSED = {  # family: {argument: a value kdpp cannot honour}
    "flux": dict(sigmas=[1.0, 0.5], ip_adapter_image=np.zeros((32, 32, 3)), ip_adapter_image_embeds=[torch.zeros(1)],
                 negative_ip_adapter_image=np.zeros((32, 32, 3)), negative_ip_adapter_image_embeds=[torch.zeros(1)]),
    "sd3": dict(sigmas=[1.0, 0.5], mu=0.8, ip_adapter_image=np.zeros((32, 32, 3)),
                ip_adapter_image_embeds=torch.zeros(1), skip_guidance_layers=[1]),
    "sdxl": dict(timesteps=[999, 499], sigmas=[14.6, 3.0], denoising_end=0.8, eta=0.3,
                 ip_adapter_image=np.zeros((32, 32, 3)), ip_adapter_image_embeds=[torch.zeros(1)], guidance_rescale=0.7,
                 callback=print, callback_steps=1),
    "wan": dict(guidance_scale_2=3.0),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_argument_of_the_diffusers_pipeline_is_taken_or_refused_by_name(family):
    """__call__ takes every argument of the wrapped pipeline's __call__; those kdpp cannot honour raise an error
    naming them, before any model call (none is silently ignored)."""
    make, teacher, args = FAMILIES[family]
    kd = make()
    reference = next(c for c in type(kd).__mro__[1:] if c.__module__.startswith("diffusers"))
    theirs = set(inspect.signature(reference.__call__).parameters) - {"self", "kwargs"}
    ours = set(inspect.signature(type(kd).__call__).parameters)
    assert theirs <= ours, sorted(theirs - ours)
    student = kd.components[kd._denoiser]
    with Calls(student) as calls:
        for name, value in REFUSED[family].items():
            with pytest.raises(ValueError, match=f"does not support {name}"):
                kd(**args, **{name: value})
    assert calls.count == 0
    assert set(REFUSED[family]) <= theirs | {"callback", "callback_steps"}


def test_sdxl_student_cfg_is_refused_and_embedding_students_take_guidance_scale():
    kd = StableDiffusionXLDistPPPipeline.from_pipe(SDXL_PIPE, teacher=SDXL_BASE, student="sdxl-lightning")
    with pytest.raises(ValueError, match=r"guidance_scale=5.0 would sample the student with CFG"):
        kd(**SDXL_ARGS, guidance_scale=5.0)
    lcm_unet = tiny_unet(2, time_cond_proj_dim=8)
    pipe = quiet(diffusers.StableDiffusionXLPipeline(**{**SDXL_PIPE.components, "unet": lcm_unet,
                                                        "scheduler": diffusers.LCMScheduler.from_config(
                                                            SDXL_PIPE.scheduler.config)}, add_watermarker=False))
    kd = StableDiffusionXLDistPPPipeline.from_pipe(pipe, teacher=SDXL_BASE, student="lcm")
    with Calls(lcm_unet) as calls:
        lcm_unet.register_forward_pre_hook(lambda m, a, kw: calls.disabled.append(kw["timestep_cond"].clone()),
                                           with_kwargs=True)
        kd(**SDXL_ARGS, num_inference_steps=1, guidance_scale=8.0, lam=0, output_type="latent")
    from kdpp.diffusers.vp import guidance_scale_embedding
    torch.testing.assert_close(calls.disabled[-1][0], guidance_scale_embedding(8.0, 8)[0])


# ------------------------------------------------------------------ diffusers features through the pipelines


class Timeline:
    """One log of model calls and offloading events, in order."""

    def __init__(self):
        self.log, self.handles = [], []

    def watch(self, module, name):
        self.handles.append(module.register_forward_pre_hook(lambda m, a: self.log.append((name, "call"))))
        self.handles.append(module.register_forward_hook(lambda m, a, out: self.log.append((name, "return"))))

    def calls_of(self, name):
        return [i for i, event in enumerate(self.log) if event == (name, "call")]

    def inside(self, name, index):
        """Whether log entry ``index`` lies between a call of ``name`` and its return."""
        depth = 0
        for who, what in self.log[:index]:
            if who == name:
                depth += 1 if what == "call" else -1 if what == "return" else 0
        return depth > 0

    def close(self):
        for handle in self.handles:
            handle.remove()


def own_flux_kd():
    """A FLUX pair with components of its own (offloading hooks stay on the modules they are put on)."""
    pipe = quiet(diffusers.FluxPipeline(**{**tiny_flux_text_pipeline(tiny_flux(0)).components,
                                           "vae": tiny_vae(1.5035, 0.0609)}))
    return FluxDistPPPipeline.from_pipe(pipe, teacher=tiny_flux(1, guidance_embeds=True))


def test_model_cpu_offload_puts_the_teacher_on_the_device_only_for_its_own_calls():
    """enable_model_cpu_offload hooks the teacher component too; before each teacher call the student is moved
    off the device, and after it the teacher is (accelerate's CpuOffload hooks; on this CPU-only machine the
    execution device is cpu:0, so the hook calls are what is checked, the devices in the gpu test)."""
    pytest.importorskip("accelerate", reason="enable_model_cpu_offload needs accelerate")
    kd = own_flux_kd()
    kd.enable_model_cpu_offload(device="cpu")
    assert {h.model for h in kd._all_hooks} >= {kd.transformer, kd.teacher_transformer}
    timeline = Timeline()
    timeline.watch(kd.transformer, "student")
    timeline.watch(kd.teacher_transformer, "teacher")
    for hook in kd._all_hooks:
        name = {id(kd.transformer): "student", id(kd.teacher_transformer): "teacher"}.get(id(hook.model), "other")
        offload = hook.offload
        hook.offload = lambda offload=offload, name=name: (timeline.log.append((name, "offload")), offload())[1]
        onload = hook.hook.pre_forward
        hook.hook.pre_forward = (lambda module, *a, onload=onload, name=name, **kw:
                                 (timeline.log.append((name, "onload")), onload(module, *a, **kw))[1])
    want = FLUX_PIPE(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent").images
    got = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent", lam=0.5, k=2).images
    timeline.close()
    log = timeline.log
    teacher_calls = timeline.calls_of("teacher")
    assert len(teacher_calls) == 2
    for start in teacher_calls:
        end = log.index(("teacher", "return"), start)
        assert log[start - 1] == ("student", "offload")  # the student leaves the device before the teacher comes
        assert log[start + 1] == ("teacher", "onload") and log[end + 1] == ("teacher", "offload")
    onloads = [i for i, event in enumerate(log) if event == ("teacher", "onload")]
    assert all(timeline.inside("teacher", i) for i in onloads)  # the teacher comes to the device only in its calls
    assert rel(got, want) > 1e-3 and torch.isfinite(got).all()


def test_group_offloading_onloads_the_teacher_only_during_its_calls(monkeypatch):
    """The pipeline's enable_group_offload covers the teacher component; its block groups are onloaded only
    inside teacher calls and offloaded again before the call returns (diffusers' ModuleGroup onload_/offload_)."""
    from diffusers.hooks import group_offloading

    kd = own_flux_kd()
    kd.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                            offload_type="block_level", num_blocks_per_group=1)
    teacher_modules = {id(m) for m in kd.teacher_transformer.modules()}
    timeline = Timeline()
    timeline.watch(kd.teacher_transformer, "teacher")
    for event in ("onload_", "offload_"):
        original = getattr(group_offloading.ModuleGroup, event)

        def record(group, original=original, event=event):
            if any(id(m) in teacher_modules for m in group.modules):
                timeline.log.append(("teacher", event))
            return original(group)

        monkeypatch.setattr(group_offloading.ModuleGroup, event, record)
    out = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent", lam=0.5, k=2).images
    timeline.close()
    onloads = [i for i, event in enumerate(timeline.log) if event == ("teacher", "onload_")]
    offloads = [i for i, event in enumerate(timeline.log) if event == ("teacher", "offload_")]
    assert len(timeline.calls_of("teacher")) == 2 and onloads and len(onloads) == len(offloads)
    assert all(timeline.inside("teacher", i) for i in onloads + offloads)
    assert torch.isfinite(out).all()


def test_first_block_cache_on_student_and_teacher():
    """With FirstBlockCache on both transformers (its hooks need a cache_context), lam = 0 equals FluxPipeline with
    the same cache and a guided run calls the teacher inside its own context."""
    from diffusers.hooks import FirstBlockCacheConfig

    student, teacher = tiny_flux(0), tiny_flux(1, guidance_embeds=True)
    pipe = quiet(diffusers.FluxPipeline(**{**FLUX_PIPE.components, "transformer": student}))
    kd = FluxDistPPPipeline.from_pipe(pipe, teacher=teacher)
    uncached = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent", lam=0).images
    student.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    teacher.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    want = pipe(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent").images
    got = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent", lam=0).images
    assert rel(got, want) < 1e-5 and rel(uncached, want) > 1e-3  # the cache changed the result, the same way
    contexts = []
    enter = teacher.cache_context
    teacher.cache_context = lambda name, **kw: (contexts.append(name), enter(name, **kw))[1]
    guided = kd(**FLUX_ARGS, num_inference_steps=4, generator=gens(1, 2), output_type="latent", lam=0.5, k=2).images
    assert contexts == ["teacher", "teacher"] and torch.isfinite(guided).all()


def test_attention_kwargs_lora_scale_reaches_the_student_as_in_the_pipeline():
    lora = add_lora(tiny_flux(3), "style", seed=9)
    pipe = quiet(diffusers.FluxPipeline(**{**FLUX_PIPE.components, "transformer": lora}))
    kd = FluxDistPPPipeline.from_pipe(pipe, teacher=FLUX_DEV)
    half = dict(joint_attention_kwargs={"scale": 0.5})
    want = pipe(**FLUX_ARGS, num_inference_steps=2, generator=gens(1, 2), output_type="latent", **half).images
    got = kd(**FLUX_ARGS, num_inference_steps=2, generator=gens(1, 2), output_type="latent", lam=0, **half).images
    full = kd(**FLUX_ARGS, num_inference_steps=2, generator=gens(1, 2), output_type="latent", lam=0).images
    assert rel(got, want) < 1e-5 and rel(full, want) > 1e-4
    seen = {}
    for name, module in (("student", lora), ("teacher", FLUX_DEV)):
        seen[name] = []
        handle = module.register_forward_pre_hook(
            lambda m, a, kw, name=name: seen[name].append(kw.get("joint_attention_kwargs")), with_kwargs=True)
        try:
            kd(**FLUX_ARGS, num_inference_steps=2, output_type="latent", lam=0.5, joint_attention_kwargs={"scale": 0.9},
               teacher_joint_attention_kwargs={"scale": 0.7})
        finally:
            handle.remove()
    assert seen == {"student": [{"scale": 0.9}] * 2, "teacher": [{"scale": 0.7}]}


def test_progress_bar_config_is_the_pipelines(capsys):
    """set_progress_bar_config (also the one of the pipeline it was built from) configures kdpp's bar: one bar of
    num_inference_steps steps, as the pipeline shows."""
    pipe = diffusers.FluxPipeline(**FLUX_PIPE.components)
    pipe.set_progress_bar_config(desc="kdpp-bar", leave=True)
    kd = FluxDistPPPipeline.from_pipe(pipe, teacher=FLUX_DEV)
    kd(**FLUX_ARGS, num_inference_steps=3, output_type="latent", lam=0.5)
    err = capsys.readouterr().err
    assert "kdpp-bar" in err and "3/3" in err
    kd.set_progress_bar_config(disable=True)
    kd(**FLUX_ARGS, num_inference_steps=3, output_type="latent", lam=0.5)
    assert capsys.readouterr().err == ""


def test_teacher_on_another_device_gets_its_inputs_there_and_answers_on_the_students(monkeypatch):
    """A CPU/CPU split (a bfloat16 teacher placed on its own): the teacher's inputs go to its execution device and its
    outputs come back to the student's. The device it reports is replaced by a stand-in (this machine has one
    device) and the moves are recorded; the gpu test below moves them for real."""
    import copy

    from diffusers.utils import torch_utils

    from kdpp.diffusers.pipelines import base

    teacher = copy.deepcopy(FLUX_DEV).to(torch.bfloat16)
    kd = FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=teacher)
    elsewhere, moves = torch.device("cuda", 1), []
    real_device = torch_utils.get_module_execution_device
    monkeypatch.setattr(torch_utils, "get_module_execution_device",
                        lambda module: elsewhere if module is teacher else real_device(module))
    monkeypatch.setattr(base, "_move", lambda value, device: (moves.append(device), value)[1])
    with Calls(teacher) as calls:
        out = kd(**FLUX_ARGS, num_inference_steps=3, generator=gens(1, 2), output_type="latent", lam=0.5, k=2).images
    assert calls.count == 2 and moves == [elsewhere, elsewhere, torch.device("cpu")] * 2  # args, kwargs; the output
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.gpu
def test_gpu_teacher_on_the_cpu_and_offloaded_teacher_on_the_gpu_only_for_its_calls():
    """Student on the GPU with the teacher on the CPU; then enable_model_cpu_offload: the teacher's weights are on
    the CPU outside its calls and on the GPU inside them, never together with the student's, and the images decode
    through the VAE's hook (the latents go to its execution device, not to the CPU its weights wait on)."""
    kd = own_flux_kd().to("cuda")
    kd.teacher_transformer.to("cpu")
    with Calls(kd.teacher_transformer) as calls:
        out = kd(**FLUX_ARGS, num_inference_steps=3, generator=gens(1, 2), output_type="latent", lam=0.5, k=2).images
    assert calls.count == 2 and out.device.type == "cuda"
    kd.enable_model_cpu_offload()
    where = []
    teacher, student = kd.teacher_transformer, kd.transformer
    for module in (teacher, student):
        module.register_forward_hook(lambda m, a, out: where.append((next(teacher.parameters()).device.type,
                                                                    next(student.parameters()).device.type)))
    images = kd(**FLUX_ARGS, num_inference_steps=3, generator=gens(1, 2), lam=0.5, k=2).images  # decoded through
    assert next(teacher.parameters()).device.type == "cpu" and len(images) == 2  # the VAE's offloading hook
    assert where.count(("cuda", "cpu")) == 2 and where.count(("cpu", "cuda")) == 3  # in each call, only the caller


# ------------------------------------------------------------------ generators, latents, embeddings


def test_generator_seeds_read_the_generators_without_advancing_them():
    one = torch.Generator().manual_seed(5)
    state = one.get_state()
    seeds = generator_seeds(one, 2, torch.device("cpu"))
    assert torch.equal(one.get_state(), state) and len(set(seeds)) == 2
    assert generator_seeds(torch.Generator().manual_seed(5), 2, torch.device("cpu")) == seeds
    one.manual_seed(6)
    assert generator_seeds(one, 2, torch.device("cpu")) != seeds
    per_image = generator_seeds(gens(1, 2), 2, torch.device("cpu"))
    assert per_image[0] == generator_seeds(gens(1), 1, torch.device("cpu"))[0]  # a list of one is one generator
    assert generator_seeds(gens(1, 2)[::-1], 2, torch.device("cpu")) == per_image[::-1]  # per image, batch-free
    torch.manual_seed(0)
    assert generator_seeds(None, 1, torch.device("cpu")) == generator_seeds(None, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="generator has 3 generators for an effective batch of 2"):
        generator_seeds(gens(1, 2, 3), 2, torch.device("cpu"))
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        generator_seeds(7, 1, torch.device("cpu"))


def test_a_guided_run_is_reproduced_by_the_same_generators_and_per_image():
    """The teacher's renoising noise comes from the generators' states: the same generators give the same guided
    images, other ones other images, and with one generator per image an image does not depend on its batch."""
    kd = flux_kd()
    args = dict(FLUX_ARGS, num_inference_steps=3, output_type="latent", lam=0.5, renoise="random")
    first = kd(**args, generator=gens(1, 2)).images
    torch.testing.assert_close(kd(**args, generator=gens(1, 2)).images, first, rtol=0, atol=0)
    assert rel(kd(**args, generator=gens(1, 3)).images[1], first[1]) > 1e-3
    alone = kd(**dict(args, prompt=FLUX_ARGS["prompt"][1]), generator=gens(2)).images
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-5)


def test_wan_lightx2v_videos_depend_on_their_batch_as_in_wan_pipeline():
    """docs/pipelines.md's exception: the lightx2v step noise is one global-RNG draw for the whole batch (WanPipeline
    passes no generator to scheduler.step), so with one generator per video a video still depends on its batch."""
    make, _, args = FAMILIES["wan"]
    kd = make()
    args = dict(args, output_type="latent", lam=0.5)
    torch.manual_seed(0)
    both = kd(**args, generator=gens(1, 2)).frames
    torch.manual_seed(0)
    alone = kd(**dict(args, prompt=args["prompt"][1]), generator=gens(2)).frames
    assert rel(alone[0], both[1]) > 1e-2


def test_one_generator_for_several_images_per_prompt_and_the_global_rng():
    """num_images_per_prompt with one generator draws the batch as FluxPipeline does; without a generator both draw
    from torch's global RNG."""
    kd = flux_kd()
    args = dict(FLUX_ARGS, prompt="a red fox", num_images_per_prompt=2, num_inference_steps=2, output_type="latent")
    want = FLUX_PIPE(**args, generator=torch.Generator().manual_seed(4)).images
    got = kd(**args, generator=torch.Generator().manual_seed(4), lam=0).images
    assert got.shape[0] == 2 and rel(got, want) < 1e-5
    torch.manual_seed(11)
    want = FLUX_PIPE(**args).images
    torch.manual_seed(11)
    assert rel(kd(**args, lam=0).images, want) < 1e-5


def test_latents_and_prompt_embeddings_as_the_pipeline_takes_them():
    """latents= (packed, as FluxPipeline takes them) and prompt_embeds= / pooled_prompt_embeds= from the pipeline's
    own encode_prompt give the pipeline's result."""
    kd = flux_kd()
    latents = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(9))
    embeds, pooled, _ = FLUX_PIPE.encode_prompt(FLUX_ARGS["prompt"], max_sequence_length=16)
    args = dict(height=32, width=32, num_inference_steps=2, output_type="latent", latents=latents,
                prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    want = FLUX_PIPE(**args).images
    got = kd(**args, lam=0).images
    assert rel(got, want) < 1e-5
    with pytest.raises(ValueError, match="the teacher needs the prompt strings"):
        kd(**args, lam=0.5, teacher_max_sequence_length=24)
    guided = kd(**args, lam=0.5).images  # the teacher takes the student's embeddings when they are its length
    assert rel(guided, want) > 1e-3


LATENTS = {  # family: (the layout's words in the error, the expected shape for FAMILIES' 2 prompts, wrong shapes)
    "flux": ("packed", (2, 4, 16), [(1, 16, 4), (2, 4, 4, 4), (2, 16, 4), (2, 4, 64), (4, 4, 16)]),
    "sd3": ("[B, C, h, w]", (2, 4, 4, 4), [(2, 16, 16), (1, 4, 4, 4), (2, 4, 8, 8)]),
    "sdxl": ("[B, C, h, w]", (2, 4, 8, 8), [(2, 4, 4, 4), (4, 4, 8, 8), (2, 64, 4)]),
    "wan": ("[B, C, F, h, w]", (2, 16, 2, 4, 4), [(2, 16, 4, 4), (2, 16, 1, 4, 4), (1, 16, 2, 4, 4)]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_latents_of_another_shape_are_refused_naming_both_shapes_in_the_pipelines_layout(family):
    """latents= of a wrong shape are refused before any model call, naming latents, the shape the pipeline takes (its
    own layout: FLUX's packed, Wan's 5-D; batch = prompts x images per prompt) and the shape the user passed."""
    make, _, args = FAMILIES[family]
    kd = make()
    layout, shape, wrong = LATENTS[family]
    with Calls(kd.components[kd._denoiser]) as calls:
        for bad in wrong:
            with pytest.raises(ValueError, match=rf"latents must be a tensor of shape {re.escape(str(shape))} "
                                                 rf"\(.*{re.escape(layout)}.* for 2 .*, got {re.escape(str(bad))}$"):
                kd(**args, latents=torch.randn(bad), lam=0)
        one = dict(args, prompt=args["prompt"][0], lam=0, **{"num_videos_per_prompt" if family == "wan" else
                                                             "num_images_per_prompt": 2})
        with pytest.raises(ValueError, match=r"for 2 (images|videos) \(prompts x num_\w+_per_prompt\)"):
            kd(**one, latents=torch.randn(1, *shape[1:]))
    assert calls.count == 0
    out = kd(**dict(args, num_inference_steps=1), latents=torch.randn(shape), lam=0, output_type="latent")
    assert tuple(getattr(out, "frames" if family == "wan" else "images").shape) == shape


def test_from_pipe_shares_components_and_checks_the_teacher():
    kd = flux_kd()
    assert all(kd.components[name] is value for name, value in FLUX_PIPE.components.items())
    assert kd.teacher_transformer is FLUX_DEV and kd.lora_pair is None
    back = diffusers.FluxPipeline.from_pipe(kd)  # a plain pipeline again
    assert back.transformer is FLUX_SCHNELL
    with pytest.raises(ValueError, match=r"teacher is the pipeline's own transformer.*SharedLoRAModel\(pipe.transformer\)"):
        FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=FLUX_SCHNELL)
    with pytest.raises(ValueError, match="SharedLoRAModel of another model than the pipeline's transformer"):
        FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=SharedLoRAModel(WAN_LORA))
    with pytest.raises(TypeError, match="teacher must be a diffusers pipeline, a transformer model"):
        FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher="flux-dev")
    with pytest.raises(ValueError, match=r"student must be one of \['flux.1-dev-lora', 'flux.1-schnell'\]"):
        FluxDistPPPipeline.from_pipe(FLUX_PIPE, teacher=FLUX_DEV, student="sdxl-lightning")
    with pytest.raises(ValueError, match="has no student preset: pass student="):
        StableDiffusionXLDistPPPipeline.from_pipe(SDXL_PIPE, teacher=SDXL_BASE)(**SDXL_ARGS)
    no_teacher = FluxDistPPPipeline.from_pipe(FLUX_PIPE)
    with pytest.raises(ValueError, match=r"teacher_transformer is None, but this run calls the teacher"):
        no_teacher(**FLUX_ARGS, num_inference_steps=2, lam=0.5)
    with pytest.raises(ValueError, match="num_inference_steps=3, but the student preset"):
        FluxDistPPPipeline.from_pipe(FLUX_PIPE, student=flow_presets.flux_schnell(2))(**FLUX_ARGS, num_inference_steps=3)


PIPES = {FluxDistPPPipeline: (FLUX_PIPE, "FluxTransformer2DModel"),
         StableDiffusion3DistPPPipeline: (SD3_PIPE, "SD3Transformer2DModel"),
         StableDiffusionXLDistPPPipeline: (SDXL_PIPE, "UNet2DConditionModel"),
         WanDistPPPipeline: (WAN_PIPE, "WanTransformer3DModel")}


@pytest.mark.parametrize("cls", sorted(PIPES, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_from_pipe_refuses_a_pipeline_or_teacher_of_another_family_naming_both(cls):
    """A pipeline of another family (as pipeline, or as teacher, or its denoiser as teacher) is refused at from_pipe,
    naming the argument, the user's classes and the class this pipeline needs, before any model call."""
    own, needs = PIPES[cls]
    for other, _ in PIPES.values():
        if other is own:
            continue
        got = f"{type(other).__name__} with {type(other.components.get('transformer') or other.unet).__name__}"
        with pytest.raises(ValueError, match=rf"{cls.__name__}.from_pipe needs an? \w+ pipeline \(a {needs} "
                                             rf"\w+\) as pipeline; got {got}"):
            cls.from_pipe(other)
        with pytest.raises(ValueError, match=rf"teacher must be an? \w+ pipeline \(a {needs} \w+\).*; got {got}"):
            cls.from_pipe(own, teacher=other)
        denoiser = other.components.get("transformer") or other.unet
        with pytest.raises(ValueError, match=rf"teacher must be a {needs},.*; got {type(denoiser).__name__}$"):
            cls.from_pipe(own, teacher=denoiser)
    if cls is StableDiffusionXLDistPPPipeline:  # a UNet, but not SDXL's (no pooled-text and size conditioning)
        sd15 = diffusers.UNet2DConditionModel(**{**dict(SDXL_BASE.config), "addition_embed_type": None})
        with pytest.raises(ValueError, match="teacher must be a UNet2DConditionModel, an SDXL pipeline"):
            cls.from_pipe(own, teacher=sd15)
    stranger = SD3_TURBO if cls is WanDistPPPipeline else WAN_LORA
    denoiser = "unet" if cls is StableDiffusionXLDistPPPipeline else "transformer"
    with pytest.raises(ValueError, match=rf"{denoiser} must be a {needs} .*got {type(stranger).__name__}$"):
        cls.from_pipe(own, **{denoiser: stranger})


def test_diffusers_from_pipe_of_a_kdpp_pipeline_casts_in_place_unless_given_torch_dtype():
    """docs/pipelines.md: FluxPipeline.from_pipe(kd) casts the shared components to float32 in place (diffusers'
    from_pipe), torch_dtype= keeps them; kdpp's from_pipe casts nothing."""
    import copy

    pipe = copy.deepcopy(FLUX_PIPE).to(torch.bfloat16)
    kd = FluxDistPPPipeline.from_pipe(pipe, teacher=copy.deepcopy(FLUX_DEV).to(torch.bfloat16))
    assert kd.transformer.dtype == kd.text_encoder_2.dtype == torch.bfloat16
    back = diffusers.FluxPipeline.from_pipe(kd, torch_dtype=torch.bfloat16)
    assert back.transformer is pipe.transformer and pipe.transformer.dtype == torch.bfloat16
    diffusers.FluxPipeline.from_pipe(kd)
    assert pipe.transformer.dtype == pipe.text_encoder_2.dtype == torch.float32  # the user's pipeline, in place
    assert kd.teacher_transformer.dtype == torch.bfloat16  # not a FluxPipeline component


def test_step_counts_the_preset_cannot_take_are_refused_naming_num_inference_steps():
    with pytest.raises(ValueError, match=r"num_inference_steps=8: FLUX.1-schnell is meant for 1 to 4 steps"):
        flux_kd()(**FLUX_ARGS, num_inference_steps=8)
    with pytest.raises(TypeError, match="num_inference_steps must be an int"):
        flux_kd()(**FLUX_ARGS, num_inference_steps=4.0)


def test_bfloat16_pipeline_calls_the_models_at_the_float32_runs_timesteps():
    """A bfloat16 copy of the FLUX pair (text encoders, transformers, VAE) calls student and teacher at the float32
    run's timesteps, as often, and gives the float32 images up to bfloat16 rounding (in bfloat16, as FluxPipeline)."""
    import copy

    runs = {}
    for dtype in (torch.float32, torch.bfloat16):
        pipe = copy.deepcopy(FLUX_PIPE).to(dtype)
        kd = FluxDistPPPipeline.from_pipe(pipe, teacher=copy.deepcopy(FLUX_DEV).to(dtype))
        timesteps = []
        for module in (kd.transformer, kd.teacher_transformer):
            module.register_forward_pre_hook(lambda m, a, kw: timesteps.append(kw["timestep"].float().clone()),
                                             with_kwargs=True)
        out = kd(**FLUX_ARGS, num_inference_steps=3, generator=gens(1, 2), output_type="pt", lam=0.5, k=2).images
        runs[dtype] = (timesteps, out)
    (t32, out32), (t16, out16) = runs[torch.float32], runs[torch.bfloat16]
    assert len(t16) == len(t32) == 5 and all(torch.equal(a, b) for a, b in zip(t16, t32))
    assert out16.dtype == torch.bfloat16 and float((out16.float() - out32).abs().max()) < 0.1  # "pt": the VAE's dtype


def sdxl_pipe(scheduler, unet=SDXL_STUDENT):
    return quiet(diffusers.StableDiffusionXLPipeline(**{**SDXL_PIPE.components, "unet": unet, "scheduler": scheduler},
                                                     add_watermarker=False))


@pytest.mark.parametrize("student", ["sdxl-turbo", "lcm", "dmd2"])
def test_stochastic_sdxl_students_at_lam0_draw_the_schedulers_noise_from_the_generators(student):
    """The ancestral and consistency students' step noise is what the SDXL pipeline's scheduler draws from the same
    generators (it passes them to scheduler.step), in its order: lam = 0 equals StableDiffusionXLPipeline with
    EulerAncestralDiscreteScheduler(trailing) (Turbo), LCMScheduler (LCM, with its guidance embedding of
    guidance_scale 8) and LCMScheduler at DMD2's timesteps 999, 749, 499, 249."""
    config = SDXL_PIPE.scheduler.config
    unet, call = SDXL_STUDENT, dict(guidance_scale=0.0, num_inference_steps=3)
    if student == "sdxl-turbo":
        scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(config, timestep_spacing="trailing")
    else:
        scheduler = diffusers.LCMScheduler.from_config(config)
    if student == "lcm":
        unet, call = tiny_unet(2, time_cond_proj_dim=8), dict(guidance_scale=8.0, num_inference_steps=4)
    pipe = sdxl_pipe(scheduler, unet)
    kd = StableDiffusionXLDistPPPipeline.from_pipe(pipe, teacher=SDXL_BASE, student=student)
    ours = dict(call, num_inference_steps=4) if student == "dmd2" else call
    reference = dict(guidance_scale=0.0, timesteps=[999, 749, 499, 249]) if student == "dmd2" else call
    want = pipe(**SDXL_ARGS, **reference, generator=gens(5, 6), output_type="latent").images
    got = kd(**SDXL_ARGS, **ours, generator=gens(5, 6), output_type="latent", lam=0).images
    assert rel(got, want) < 1e-5
    other = kd(**SDXL_ARGS, **ours, generator=gens(5, 7), output_type="latent", lam=0).images
    assert rel(other[1], want[1]) > 1e-2  # the second image's generator draws its noise


@pytest.mark.parametrize("callback", [None, "step by step"])
def test_wan_lightx2v_lora_at_lam0_is_wan_pipeline_with_the_recipe_scheduler(callback):
    """The LoRA pair at lam = 0 is WanPipeline with the LoRA active and the recipe's stochastic scheduler,
    guidance_scale 1; WanPipeline does not pass its generator to scheduler.step, so both draw the step noise from
    torch's global RNG (seeded alike here), also when a callback makes the run go step by step."""
    scheduler = recipe_scheduler(shift=5.0, stochastic_sampling=True)
    pipe = quiet(diffusers.WanPipeline(**{**WAN_PIPE.components, "scheduler": scheduler}))
    kd = WanDistPPPipeline.from_pipe(pipe, teacher=SharedLoRAModel(WAN_LORA))
    args = dict(WAN_ARGS, num_inference_steps=4, guidance_scale=1.0, output_type="np")
    torch.manual_seed(3)
    want = pipe(**args, generator=gens(7, 8)).frames
    torch.manual_seed(3)
    with Calls(WAN_LORA) as calls:
        got = kd(**args, generator=gens(7, 8), lam=0,
                 callback_on_step_end=(lambda p, i, t, kw: {}) if callback else None).frames
    assert rel(got, want) < 1e-5 and calls.disabled == [False] * 4


def test_sdxl_micro_conditioning_reaches_the_student_and_the_teachers_halves():
    """original_size / crops_coords_top_left / target_size are the pipeline's (lam = 0 equals it); the negative sizes
    condition the teacher's unconditional half only (the pipeline's own _get_add_time_ids builds both)."""
    kd = StableDiffusionXLDistPPPipeline.from_pipe(SDXL_PIPE, teacher=SDXL_BASE, student="sdxl-lightning")
    sizes = dict(original_size=(128, 96), crops_coords_top_left=(8, 0), target_size=(64, 64))
    args = dict(SDXL_ARGS, num_inference_steps=2, guidance_scale=0.0, output_type="latent")
    want = SDXL_PIPE(**args, **sizes, generator=gens(5, 6)).images
    assert rel(kd(**args, **sizes, generator=gens(5, 6), lam=0).images, want) < 1e-5
    assert rel(kd(**args, generator=gens(5, 6), lam=0).images, want) > 1e-4  # the sizes matter
    seen = []
    handle = SDXL_BASE.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"].clone()), with_kwargs=True)
    try:
        kd(**args, **sizes, negative_original_size=(32, 32), negative_target_size=(48, 48), lam=0.5)
    finally:
        handle.remove()
    (ids,) = seen  # one teacher call, CFG batched [uncond, cond] over the 2 images
    assert ids.tolist() == [[32, 32, 0, 0, 48, 48]] * 2 + [[128, 96, 8, 0, 64, 64]] * 2
