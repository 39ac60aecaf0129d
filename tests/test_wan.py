"""Wan 2.1 text-to-video against diffusers' own WanPipeline, on its tiny test transformer with a real peft LoRA.

The references are ``WanPipeline`` itself (``output_type="latent"`` and ``"np"``) with a UMT5 text encoder
of transformers' test configuration, diffusers' schedulers, and the lightx2v recipe's published numbers.
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
pytest.importorskip("transformers", reason="the reference pipeline imports transformers")
pytest.importorskip("peft", reason="the LoRA student needs peft")
from tiny_diffusers import (add_lora, recipe_scheduler, tiny_flux, tiny_wan, tiny_wan_text_pipeline,  # noqa: E402
                            tiny_wan_vae)

from kdpp.diffusers import flow_presets, wan  # noqa: E402
from kdpp.diffusers.lora import SharedLoRAModel  # noqa: E402
from kdpp.noise import stream_seed  # noqa: E402

SIZE = dict(height=32, width=32, num_frames=5)  # latents [16, 2, 4, 4]
SEEDS = [11, 12]


def lora_transformer(seed=0):
    """The tiny Wan transformer with a random step-distillation-style LoRA (peft, diffusers' add_adapter)."""
    return add_lora(tiny_wan(seed), "lightx2v", seed=3)


TRANSFORMER = lora_transformer()
PAIR = SharedLoRAModel(TRANSFORMER)
PIPE = tiny_wan_text_pipeline(TRANSFORMER)
with torch.no_grad():
    EMBEDS = PIPE.encode_prompt(["a fox", "a cat runs"], ["blurry", "ugly"], max_sequence_length=16, device="cpu")
COND = wan.WanConditioning(*EMBEDS)


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def solver_noise_of(seed, pipe_kwargs):
    """Seed the global RNG, which the stochastic scheduler draws step j's noise from, with the kdpp seed's solver
    stream of step j (kdpp.noise): before step 0, and after each step through the pipeline's callback_on_step_end."""
    def seed_step(j):
        torch.manual_seed(stream_seed(stream_seed(seed, 1), j))

    def callback(pipe, i, t, tensors):
        seed_step(i + 1)
        return {}

    seed_step(0)
    return {**pipe_kwargs, "callback_on_step_end": callback}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def first(cond):
    return wan.WanConditioning(cond.prompt_embeds[:1], cond.negative_prompt_embeds[:1])


class Calls:
    """Records every forward of a module (keyword arguments, and whether its adapters were disabled)."""

    def __init__(self, module):
        self.kwargs, self.disabled = [], []
        self.layer = next((m for m in module.modules() if hasattr(m, "_disable_adapters")), None)
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.kwargs.append({key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()})
        self.disabled.append(self.layer is not None and bool(self.layer._disable_adapters))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ------------------------------------------------------------------ the recipe and the schedule


def test_lightx2v_preset_is_the_published_recipe():
    """4 steps at lightx2v's timesteps 1000, 937.5, 833.3, 625 (shift 5 of 1000, 750, 500, 250), x0 + fresh noise
    (diffusers' stochastic_sampling: kdpp's "lcm"), no CFG; the teacher is Wan with CFG 5.0, WanPipeline's default."""
    import inspect

    preset = flow_presets.wan21_lightx2v()
    ts = wan.WanVelocity(TRANSFORMER).schedule(preset.scheduler_config, preset.steps, (16, 2, 4, 4), preset.schedule)
    torch.testing.assert_close(ts * 1000, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0, 0.0]), rtol=1e-6, atol=1e-4)
    assert (preset.sampler, preset.cfg_scale, preset.guidance, preset.k) == ("lcm", 1.0, None, 1)
    assert preset.teacher.cfg_scale == inspect.signature(diffusers.WanPipeline.__call__).parameters["guidance_scale"].default
    assert flow_presets.STUDENTS["wan2.1-lightx2v"] is flow_presets.wan21_lightx2v
    with pytest.raises(ValueError, match="is distilled for 4 steps"):
        flow_presets.wan21_lightx2v(12)


# ------------------------------------------------------------------ lam = 0 is WanPipeline


def test_lam0_lora_student_is_wan_pipeline_with_the_recipe_scheduler():
    """The LoRA pair at lam = 0 is WanPipeline with the LoRA active and the recipe's stochastic Euler scheduler
    (guidance_scale 1); the scheduler's step noise (the global RNG's) is seeded with the kdpp seed's solver stream."""
    pipe = tiny_wan_text_pipeline(TRANSFORMER, scheduler=recipe_scheduler(shift=5.0, stochastic_sampling=True))
    want = pipe(**solver_noise_of(SEEDS[0], dict(
        prompt_embeds=COND.prompt_embeds[:1], num_inference_steps=4, guidance_scale=1.0, output_type="latent",
        generator=generators(SEEDS[:1]), **SIZE))).frames
    with Calls(TRANSFORMER) as calls:
        got = wan.generate(PAIR.student, PAIR.teacher, first(COND), seeds=SEEDS[:1], lam=0.0, disable=True, **SIZE)
    assert got.shape == want.shape == (1, 16, 2, 4, 4)
    assert rel(got, want) < 1e-5
    assert len(calls.kwargs) == 4 and not any(calls.disabled)  # four student calls, the LoRA on, no teacher call
    torch.testing.assert_close(calls.kwargs[0]["hidden_states"],  # the start is the pipeline's noise, exactly
                               diffusers.utils.torch_utils.randn_tensor(want.shape, generator=generators(SEEDS[:1])),
                               rtol=0, atol=0)


def test_lam0_base_model_with_cfg_is_wan_pipeline():
    """The base model sampled as a student with Wan's CFG 5 (one batched call, the pipeline makes two), Euler at
    the pipeline's own FlowMatchEulerDiscreteScheduler timesteps, a batch of two with per-video generators."""
    base = tiny_wan(0)
    preset = dataclasses.replace(flow_presets.wan21_lightx2v(), sampler="euler", schedule="pipeline", cfg_scale=5.0,
                                 scheduler_config={"num_train_timesteps": 1000, "shift": 5.0}, steps=3)
    pipe = tiny_wan_text_pipeline(base, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    want = pipe(prompt_embeds=COND.prompt_embeds, negative_prompt_embeds=COND.negative_prompt_embeds, num_inference_steps=3,
                guidance_scale=5.0, output_type="latent", generator=generators(), **SIZE).frames
    got = wan.generate(base, None, COND, preset, seeds=SEEDS, lam=0.0, disable=True, **SIZE)
    assert rel(got, want) < 1e-5


def test_decoded_videos_are_the_pipelines():
    """With the Wan VAE (latents_mean/latents_std, 4x temporal compression), generate's frames are the pipeline's."""
    vae = tiny_wan_vae()
    pipe = tiny_wan_text_pipeline(TRANSFORMER, scheduler=recipe_scheduler(shift=5.0, stochastic_sampling=True), vae=vae)
    want = pipe(**solver_noise_of(SEEDS[0], dict(
        prompt_embeds=COND.prompt_embeds[:1], num_inference_steps=2, guidance_scale=1.0, output_type="np",
        generator=generators(SEEDS[:1]), **SIZE))).frames
    got = wan.generate(PAIR.student, PAIR.teacher, first(COND), flow_presets.wan21_lightx2v(2), seeds=SEEDS[:1], lam=0.0,
                       vae=vae, disable=True, **SIZE)
    assert len(got) == 1 and len(got[0]) == SIZE["num_frames"] and got[0][0].size == (32, 32)
    frames = np.stack([np.asarray(im, dtype=int) for im in got[0]])
    assert np.abs(frames - (want[0] * 255).round()).max() <= 1


# ------------------------------------------------------------------ the teacher: the same transformer, LoRA off, CFG


def test_teacher_is_the_base_model_with_cfg_once_per_guided_step():
    preset = flow_presets.wan21_lightx2v(4)
    steps = []
    with Calls(TRANSFORMER) as calls:
        out = wan.generate(PAIR.student, PAIR.teacher, COND, preset, seeds=SEEDS, lam=0.5, k=1, renoise="deterministic",
                           callback=steps.append, disable=True, **SIZE)
    assert torch.isfinite(out).all()
    assert calls.disabled == [False, True, False, False, False]  # 4 student calls, one teacher call after the first
    kw, t_next = calls.kwargs[1], float(wan.WanVelocity(TRANSFORMER).schedule(
        preset.scheduler_config, 4, (16, 2, 4, 4), preset.schedule)[1])
    torch.testing.assert_close(kw["timestep"], torch.full((4,), 1000 * t_next), rtol=1e-6, atol=0)
    torch.testing.assert_close(kw["encoder_hidden_states"], torch.cat([COND.negative_prompt_embeds, COND.prompt_embeds]))
    d, x = steps[0]["student_denoised"], steps[0]["x"]
    tau = t_next / (1 - t_next)
    x_rf = (d + tau * (x - d) / steps[0]["sigma_hat"]) / (1 + tau)  # the renoised point, flow frame
    torch.testing.assert_close(kw["hidden_states"], torch.cat([x_rf, x_rf]), rtol=1e-5, atol=1e-5)
    base = tiny_wan(0)  # the same weights without the LoRA: the pipeline's two CFG calls
    with torch.no_grad():
        v_u, v_c = (base(hidden_states=x_rf, timestep=kw["timestep"][:2], encoder_hidden_states=e, return_dict=False)[0]
                    for e in (COND.negative_prompt_embeds, COND.prompt_embeds))
    torch.testing.assert_close(steps[0]["teacher_denoised"], x_rf - t_next * (v_u + 5.0 * (v_c - v_u)), rtol=1e-4, atol=1e-5)
    assert "teacher_denoised" not in steps[1]


def test_separate_teacher_transformer_and_teacher_none():
    """A separate teacher transformer is called once per guided step; teacher None is taken where it is never called
    and refused by name where it would be."""
    teacher = tiny_wan(1)
    with Calls(teacher) as calls:
        wan.generate(PAIR.student, teacher, COND, seeds=SEEDS, k=2, disable=True, **SIZE)
    assert len(calls.kwargs) == 2 and all(kw["hidden_states"].shape[0] == 4 for kw in calls.kwargs)
    plain = wan.generate(PAIR.student, None, COND, seeds=SEEDS, lam=0.0, disable=True, **SIZE)
    torch.testing.assert_close(plain, wan.generate(PAIR.student, teacher, COND, seeds=SEEDS, k=0, disable=True, **SIZE))
    with pytest.raises(ValueError, match=r"teacher_transformer is None, but this run calls the teacher \(lam=0.5 on k=1\)"):
        wan.generate(PAIR.student, None, COND, seeds=SEEDS, lam=0.5, **SIZE)


def test_half_precision_calls_the_models_at_the_float32_timesteps():
    recorded = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        model = copy.deepcopy(TRANSFORMER).to(dtype)
        pair = SharedLoRAModel(model)
        with Calls(model) as calls:
            out = wan.generate(pair.student, pair.teacher, COND, seeds=SEEDS, lam=0.5, k=2, disable=True, **SIZE)
        recorded[dtype] = (out, calls)
    out32, calls32 = recorded[torch.float32]
    for dtype in (torch.bfloat16, torch.float16):
        out, calls = recorded[dtype]
        assert calls.disabled == calls32.disabled == [False, True, False, True, False, False]
        for a, b in zip(calls32.kwargs, calls.kwargs):
            assert torch.equal(a["timestep"], b["timestep"]) and b["timestep"].dtype == torch.float32
            assert b["hidden_states"].dtype == dtype and b["encoder_hidden_states"].dtype == dtype
        assert out.dtype == torch.float32 and torch.isfinite(out).all() and rel(out, out32) < 0.1


def test_per_video_seeds_are_batch_independent():
    batch = wan.generate(PAIR.student, PAIR.teacher, COND, seeds=[7, 8], disable=True, **SIZE)
    single = wan.generate(PAIR.student, PAIR.teacher, wan.WanConditioning(COND.prompt_embeds[1:], COND.negative_prompt_embeds[1:]),
                          seeds=[8], disable=True, **SIZE)
    torch.testing.assert_close(batch[1:], single, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ refusals


@pytest.mark.parametrize("size, error, message", [
    (dict(num_frames=6), ValueError, r"num_frames must be 4 n \+ 1 .* got 6"),
    (dict(num_frames=0), ValueError, "num_frames must be 4 n"),
    (dict(num_frames=5.0), TypeError, "num_frames must be an int"),
    (dict(height=40), ValueError, r"height must be a positive multiple of 16 \(Wan"),
    (dict(width=0), ValueError, "width must be a positive multiple of 16"),
])
def test_sizes_the_vae_or_patching_cannot_take_are_refused(size, error, message):
    with pytest.raises(error, match=message):
        wan.generate(PAIR.student, PAIR.teacher, COND, seeds=SEEDS, **{**SIZE, **size})


def test_mismatches_are_refused_before_any_call():
    with Calls(TRANSFORMER) as calls:
        with pytest.raises(ValueError, match="teacher_transformer is not a WanPipeline"):
            wan.generate(PAIR.student, tiny_flux(), COND, seeds=SEEDS, **SIZE)
        with pytest.raises(ValueError, match=r"conditioning.prompt_embeds has width 16, student_transformer takes 32"):
            wan.generate(PAIR.student, PAIR.teacher, wan.WanConditioning(torch.zeros(2, 7, 16)), seeds=SEEDS, **SIZE)
        with pytest.raises(ValueError, match=r"teacher_conditioning has no negative prompt embeddings.*\(cfg_scale 5.0\)"):
            wan.generate(PAIR.student, PAIR.teacher, wan.WanConditioning(COND.prompt_embeds), seeds=SEEDS, **SIZE)
        with pytest.raises(ValueError, match="conditioning.prompt_embeds has batch 2, seeds has 1"):
            wan.generate(PAIR.student, PAIR.teacher, COND, seeds=[1], **SIZE)
        with pytest.raises(ValueError, match=r"takes latents \[B, 16, F, h, w\]"):
            wan.WanVelocity(TRANSFORMER, "student_transformer")(torch.zeros(1, 16, 4, 4), torch.ones(1))
        with pytest.raises(ValueError, match="vae has 4 latent channels"):
            vae = type("VAE", (), {"config": type("C", (), {"z_dim": 4})(), "decode": lambda self, z: z})()
            wan.generate(PAIR.student, PAIR.teacher, COND, seeds=SEEDS, vae=vae, **SIZE)
        with pytest.raises(ValueError, match=r"WanConditioning.negative_prompt_embeds has shape \(2, 8, 16\), prompt_embeds "
                                             r"\(2, \d+, 32\); they must match but in token count"):
            wan.WanConditioning(COND.prompt_embeds, COND.negative_prompt_embeds[:, :8, :16])
    assert not calls.kwargs


def test_conditioning_takes_encode_prompt_return_order():
    assert COND.prompt_embeds is EMBEDS[0] and COND.negative_prompt_embeds is EMBEDS[1]
    with torch.no_grad():
        positive_only = PIPE.encode_prompt(["a fox"], do_classifier_free_guidance=False, max_sequence_length=16,
                                           device="cpu")
    cond = wan.WanConditioning(*positive_only)
    assert not cond.has_negative and cond.prompt_embeds.shape == (1, 16, 32)
