"""Flow students and teachers (SD3.5, FLUX) against diffusers' own pipelines, on tiny random transformers.

The references are diffusers' ``StableDiffusion3Pipeline`` and ``FluxPipeline`` themselves (run with
precomputed embeddings and ``output_type="latent"``) and their helpers (``_pack_latents``,
``_prepare_latent_image_ids``, ``calculate_shift``, ``retrieve_timesteps``); the transformers use the
configurations of diffusers' own model tests (FLUX with 16 packed channels, i.e. 4 latent channels).
"""
import copy
import dataclasses

import numpy as np
import pytest
import torch

import kdpp

from kdpp.diffusers import flow_presets, flux, sd3
from kdpp.diffusers.flow_models import FlowConditioning, calculate_shift
from kdpp.flow import FlowDenoiser, flow_sigmas, initial_noise_scale

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
pytest.importorskip("transformers", reason="the reference pipelines import transformers")
from diffusers.pipelines.flux import pipeline_flux  # noqa: E402
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as pipeline_sd3  # noqa: E402
from tiny_diffusers import add_lora, tiny_flux, tiny_sd3  # noqa: E402

FluxPipeline, SD3Pipeline = pipeline_flux.FluxPipeline, pipeline_sd3.StableDiffusion3Pipeline
SEEDS = [11, 12]


def embeddings(seq, dim, pooled, seed):
    g = torch.Generator().manual_seed(seed)
    prompt, pooled_prompt = torch.randn(2, seq, dim, generator=g), torch.randn(2, pooled, generator=g)
    return FlowConditioning(prompt, torch.randn(2, seq, dim, generator=g), pooled_prompt, torch.randn(2, pooled, generator=g))


SCHNELL, DEV, DEV_TEACHER = tiny_flux(0), tiny_flux(1, guidance_embeds=True), tiny_flux(2, guidance_embeds=True)
LARGE_TURBO, LARGE = tiny_sd3(3), tiny_sd3(4)
FLUX_COND, SD3_COND = embeddings(7, 32, 32, 5), embeddings(9, 32, 64, 6)


def generators(seeds=SEEDS):
    return [torch.Generator().manual_seed(s) for s in seeds]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


class Calls:
    """Records every forward of a module (its keyword arguments) with a pre-hook."""

    def __init__(self, module):
        self.kwargs = []
        self.handle = module.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.kwargs.append({key: v.clone() if isinstance(v, torch.Tensor) else v for key, v in kwargs.items()})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def flux_pipeline(transformer, preset):
    return FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**preset.scheduler_config), vae=None,
                        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)


def sd3_pipeline(transformer, scheduler_config):
    return SD3Pipeline(transformer=transformer, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**scheduler_config),
                       vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                       text_encoder_3=None, tokenizer_3=None)


def flux_reference_schedule(preset, height, width):
    """The flow times FluxPipeline sets: sigmas linspace(1, 1/N, N), mu from the packed token count."""
    n = preset.steps
    packed = FluxPipeline._pack_latents(torch.zeros(1, 4, height // 8, width // 8), 1, 4, height // 8, width // 8)
    config = diffusers.FlowMatchEulerDiscreteScheduler(**preset.scheduler_config).config
    mu = pipeline_flux.calculate_shift(packed.shape[1], config.get("base_image_seq_len", 256),
                                       config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                       config.get("max_shift", 1.15))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**preset.scheduler_config)
    pipeline_flux.retrieve_timesteps(scheduler, n, "cpu", sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    return scheduler.sigmas


# ------------------------------------------------------------------ helpers and schedules


@pytest.mark.parametrize("seq", [64, 256, 1024, 4096, 6144])
def test_calculate_shift_is_the_pipelines(seq):
    assert calculate_shift(seq) == pytest.approx(pipeline_flux.calculate_shift(seq), rel=1e-12)
    args = (seq, 128, 2048, 0.3, 1.16)
    assert calculate_shift(*args) == pytest.approx(pipeline_sd3.calculate_shift(*args), rel=1e-12)


def test_packing_and_ids_are_the_flux_pipelines():
    latents = torch.randn(3, 4, 6, 10)
    packed = flux.pack_latents(latents)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(latents, 3, 4, 6, 10), rtol=0, atol=0)
    torch.testing.assert_close(flux.unpack_latents(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8),
                               rtol=0, atol=0)
    torch.testing.assert_close(flux.latent_image_ids(3, 5), FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))


@pytest.mark.parametrize("size", [(1024, 1024), (768, 1360), (512, 512)])
@pytest.mark.parametrize("preset", [flow_presets.flux_schnell(4), flow_presets.flux_dev_lora(8)], ids=lambda p: p.name)
def test_flux_schedule_is_the_pipelines_at_real_sizes(preset, size):
    """Static shift (schnell) and FLUX.1-dev's dynamic shift over the packed token count, at FLUX resolutions."""
    model = flux.FluxVelocity(tiny_flux(guidance_embeds=preset.guidance is not None), guidance=preset.guidance)
    got = model.schedule(preset.scheduler_config, preset.steps, model.latent_shape(*size))
    torch.testing.assert_close(got, flux_reference_schedule(preset, *size), rtol=0, atol=0)


def test_sd35_schedule_is_the_pipelines():
    preset = flow_presets.sd35_large_turbo(4)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**preset.scheduler_config)
    pipeline_sd3.retrieve_timesteps(scheduler, 4, "cpu")
    got = sd3.SD3Velocity(LARGE_TURBO).schedule(preset.scheduler_config, 4, (4, 16, 16))
    torch.testing.assert_close(got, scheduler.sigmas, rtol=0, atol=0)


# ------------------------------------------------------------------ lam = 0 is the pipeline


FLUX_DEV_50 = dataclasses.replace(flow_presets.flux_dev_lora(), steps=50)  # FLUX.1-dev's own sampling as a student


@pytest.mark.parametrize("preset, student", [(flow_presets.flux_schnell(4), SCHNELL), (flow_presets.flux_dev_lora(6), DEV),
                                             (FLUX_DEV_50, DEV)],
                         ids=["schnell-static-shift", "dev-dynamic-shift-guidance", "dev-50-steps"])
def test_lam0_is_flux_pipeline(preset, student):
    height, width = 64, 96
    want = flux_pipeline(student, preset)(
        prompt_embeds=FLUX_COND.prompt_embeds, pooled_prompt_embeds=FLUX_COND.pooled_prompt_embeds, height=height,
        width=width, num_inference_steps=preset.steps, guidance_scale=preset.guidance or 0.0, output_type="latent",
        generator=generators()).images
    want = FluxPipeline._unpack_latents(want, height, width, 8)
    with Calls(DEV_TEACHER) as teacher_calls, Calls(student) as student_calls:
        got = flux.generate(student, DEV_TEACHER, FLUX_COND, preset, seeds=SEEDS, height=height, width=width, lam=0.0,
                            disable=True)
    assert rel(got, want) < 1e-5
    assert not teacher_calls.kwargs and len(student_calls.kwargs) == preset.steps
    noise = diffusers.utils.torch_utils.randn_tensor((2, 4, height // 8, width // 8), generator=generators())
    torch.testing.assert_close(student_calls.kwargs[0]["hidden_states"],  # the start is the pipeline's noise, exactly
                               FluxPipeline._pack_latents(noise, 2, 4, height // 8, width // 8), rtol=0, atol=0)


@pytest.mark.parametrize("cfg_scale, steps", [(1.0, 4), (3.5, 4), (3.5, 28)], ids=["turbo-no-cfg", "true-cfg", "cfg-28-steps"])
def test_lam0_is_sd3_pipeline(cfg_scale, steps):
    preset = dataclasses.replace(flow_presets.sd35_large_turbo(4), cfg_scale=cfg_scale, steps=steps)
    c = SD3_COND
    want = sd3_pipeline(LARGE_TURBO, preset.scheduler_config)(
        prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds,
        negative_prompt_embeds=c.negative_prompt_embeds, negative_pooled_prompt_embeds=c.negative_pooled_prompt_embeds,
        height=128, width=96, num_inference_steps=steps, guidance_scale=cfg_scale if cfg_scale > 1 else 0.0,
        output_type="latent", generator=generators()).images
    with Calls(LARGE) as teacher_calls:
        got = sd3.generate(LARGE_TURBO, LARGE, c, preset, seeds=SEEDS, height=128, width=96, lam=0.0, disable=True)
    assert rel(got, want) < 1e-5
    assert not teacher_calls.kwargs


def test_lcm_sampler_is_the_schedulers_stochastic_sampling():
    """kdpp's multistep-consistency step is FlowMatchEulerDiscreteScheduler(stochastic_sampling=True): x0 + fresh noise."""
    preset = flow_presets.sd35_large_turbo(4)
    config = {**preset.scheduler_config, "stochastic_sampling": True}
    c = SD3_COND
    torch.manual_seed(99)  # the scheduler draws its step noise from the global generator
    want = sd3_pipeline(LARGE_TURBO, config)(
        prompt_embeds=c.prompt_embeds, pooled_prompt_embeds=c.pooled_prompt_embeds, height=64, width=64,
        num_inference_steps=4, guidance_scale=0.0, output_type="latent", generator=generators()).images
    model = sd3.SD3Velocity(LARGE_TURBO)
    ts = model.schedule(config, 4, (4, 8, 8))
    noise = diffusers.utils.torch_utils.randn_tensor((2, 4, 8, 8), generator=generators())
    replay = torch.Generator().manual_seed(99)
    got = kdpp.sample_lcm_distpp(FlowDenoiser(model), None, noise * initial_noise_scale(ts), flow_sigmas(ts), 0.0,
                                 extra_args=c.kwargs(), noise_sampler=lambda s, s_next: torch.randn(2, 4, 8, 8, generator=replay),
                                 disable=True)
    assert rel(got, want) < 1e-5


# ------------------------------------------------------------------ lam > 0: the teacher calls


def guided_run(generate, student, teacher, cond, preset, k, **options):
    steps = []
    with Calls(teacher) as calls:
        out = generate(student, teacher, cond, preset, seeds=SEEDS, height=64, width=64, lam=0.5, k=k,
                       renoise="deterministic", disable=True, callback=steps.append, **options)
    return out, steps, calls.kwargs


def expected_teacher_input(info, tau):
    """The RF point of the VE renoised estimate D + tau xi, with the deterministic xi = (x - D) / sigma."""
    d = info["student_denoised"]
    xi = (info["x"] - d) / info["sigma_hat"]
    return (d + tau * xi) / (1 + tau)


def test_flux_dev_teacher_once_per_guided_step_with_its_guidance_embedding():
    preset = flow_presets.flux_schnell(4)
    ts = flux_reference_schedule(preset, 64, 64)
    out, steps, calls = guided_run(flux.generate, SCHNELL, DEV_TEACHER, FLUX_COND, preset, k=2)
    assert torch.isfinite(out).all() and len(calls) == 2  # one forward per guided step: no CFG batch
    for i, kw in enumerate(calls):
        t_next = ts[i + 1]
        torch.testing.assert_close(kw["timestep"], t_next.expand(2), rtol=1e-6, atol=0)
        torch.testing.assert_close(kw["guidance"], torch.full((2,), 3.5))
        x_rf = expected_teacher_input(steps[i], float(t_next / (1 - t_next)))
        torch.testing.assert_close(FluxPipeline._unpack_latents(kw["hidden_states"], 64, 64, 8), x_rf, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # the teacher's estimate: the pipeline-style call at that point
            v = DEV_TEACHER(hidden_states=FluxPipeline._pack_latents(x_rf, 2, 4, 8, 8), timestep=t_next.expand(2),
                            guidance=torch.full([1], 3.5).expand(2), pooled_projections=FLUX_COND.pooled_prompt_embeds,
                            encoder_hidden_states=FLUX_COND.prompt_embeds, txt_ids=torch.zeros(7, 3),
                            img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32),
                            return_dict=False)[0]
        want = x_rf - t_next * FluxPipeline._unpack_latents(v, 64, 64, 8)
        torch.testing.assert_close(steps[i]["teacher_denoised"], want, rtol=1e-5, atol=1e-5)
    assert "teacher_denoised" not in steps[2] and "teacher_denoised" not in steps[3]


def test_sd35_large_teacher_cfg_batched_once_per_guided_step():
    preset = flow_presets.sd35_large_turbo(4)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**preset.scheduler_config)
    timesteps, _ = pipeline_sd3.retrieve_timesteps(scheduler, 4, "cpu")
    c = SD3_COND
    out, steps, calls = guided_run(sd3.generate, LARGE_TURBO, LARGE, c, preset, k=1)
    assert torch.isfinite(out).all() and len(calls) == 1
    kw, t_next = calls[0], scheduler.sigmas[1]
    torch.testing.assert_close(kw["timestep"], timesteps[1].expand(4), rtol=1e-6, atol=0)
    torch.testing.assert_close(kw["encoder_hidden_states"], torch.cat([c.negative_prompt_embeds, c.prompt_embeds]))
    torch.testing.assert_close(kw["pooled_projections"], torch.cat([c.negative_pooled_prompt_embeds, c.pooled_prompt_embeds]))
    x_rf = expected_teacher_input(steps[0], float(t_next / (1 - t_next)))
    torch.testing.assert_close(kw["hidden_states"], torch.cat([x_rf, x_rf]), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # CFG from two separate calls, as the pipeline's formula
        v_u, v_c = (LARGE(hidden_states=x_rf, timestep=timesteps[1].expand(2), encoder_hidden_states=e,
                          pooled_projections=p, return_dict=False)[0]
                    for e, p in ((c.negative_prompt_embeds, c.negative_pooled_prompt_embeds),
                                 (c.prompt_embeds, c.pooled_prompt_embeds)))
    want = x_rf - t_next * (v_u + 3.5 * (v_c - v_u))
    torch.testing.assert_close(steps[0]["teacher_denoised"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(steps[0]["denoised"], steps[0]["student_denoised"] + 0.5 * (want - steps[0]["student_denoised"]),
                               rtol=1e-5, atol=1e-5)


def test_guided_steps_pick_the_teacher_steps():
    """guided_steps=[1, -2]: the teacher is called at steps 1 and 2 only, at their next times."""
    preset = flow_presets.flux_schnell(4)
    ts = flux_reference_schedule(preset, 64, 64)
    with Calls(DEV_TEACHER) as calls:
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, lam=0.5,
                      guided_steps=[1, -2], disable=True)
    assert [float(kw["timestep"][0]) for kw in calls.kwargs] == pytest.approx([float(ts[2]), float(ts[3])], rel=1e-6)


def test_flux_teacher_conditioning_can_differ():
    """FLUX.1-schnell runs on 256 T5 tokens, FLUX.1-dev on 512: each transformer gets its own embeddings."""
    teacher_cond = embeddings(12, 32, 32, 9)
    _, _, calls = guided_run(flux.generate, SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.flux_schnell(2), k=1,
                             teacher_conditioning=teacher_cond)
    torch.testing.assert_close(calls[0]["encoder_hidden_states"], teacher_cond.prompt_embeds)
    assert calls[0]["txt_ids"].shape == (12, 3)


# ------------------------------------------------------------------ diffusers features through the body


def latent_flux_run(transformer, preset, **call):
    """FluxPipeline's final latents, unpacked, for FLUX_COND at 64 x 64."""
    want = flux_pipeline(transformer, preset)(
        prompt_embeds=FLUX_COND.prompt_embeds, pooled_prompt_embeds=FLUX_COND.pooled_prompt_embeds, height=64, width=64,
        num_inference_steps=preset.steps, guidance_scale=preset.guidance or 0.0, output_type="latent",
        generator=generators(), **call).images
    return FluxPipeline._unpack_latents(want, 64, 64, 8)


def test_first_block_cache_runs_each_role_in_its_own_cache_context():
    """With transformer.enable_cache(FirstBlockCacheConfig(...)) (whose hooks raise "No cache context is set" outside
    model.cache_context): lam = 0 equals FluxPipeline with the same cache, at a threshold where the cache skips blocks
    of this model; a guided run on one shared LoRA transformer calls the student in context "student" with its
    adapters on and the teacher in "teacher" with them off."""
    from diffusers.hooks import FirstBlockCacheConfig

    from kdpp.diffusers.lora import SharedLoRAModel

    model = tiny_flux(7)
    preset = flow_presets.flux_schnell(4)
    uncached = flux.generate(model, None, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, lam=0.0, disable=True)
    model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    want = latent_flux_run(model, preset)
    got = flux.generate(model, None, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, lam=0.0, disable=True)
    assert rel(got, want) < 1e-5 and rel(uncached, want) > 1e-3  # the cache changed the result, the same way

    lora = add_lora(tiny_flux(8, guidance_embeds=True))
    lora.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    pair, contexts, roles = SharedLoRAModel(lora), [], []
    enter = lora.cache_context
    lora.cache_context = lambda name, **kwargs: (contexts.append(name), enter(name, **kwargs))[1]
    layer = next(m for m in lora.modules() if hasattr(m, "_disable_adapters"))
    lora.register_forward_pre_hook(lambda module, args: roles.append(layer._disable_adapters))
    out = flux.generate(pair.student, pair.teacher, FLUX_COND, flow_presets.flux_dev_lora(3), seeds=SEEDS, height=64,
                        width=64, k=2, disable=True)
    assert torch.isfinite(out).all()
    assert list(zip(contexts, roles)) == [("student", False), ("teacher", True), ("student", False), ("teacher", True),
                                          ("student", False)]


def test_attention_kwargs_reach_the_transformers():
    """attention_kwargs reach every student call as the transformer's joint_attention_kwargs (a LoRA scale: lam = 0
    equals FluxPipeline with joint_attention_kwargs={"scale": 0.5}), teacher_attention_kwargs every teacher call."""
    model = add_lora(tiny_flux(9))
    preset = flow_presets.flux_schnell(2)
    half = flux.generate(model, None, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, lam=0.0, disable=True,
                         attention_kwargs={"scale": 0.5})
    assert rel(half, latent_flux_run(model, preset, joint_attention_kwargs={"scale": 0.5})) < 1e-5
    full = flux.generate(model, None, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, lam=0.0, disable=True)
    assert rel(full, half) > 1e-4
    with Calls(SCHNELL) as student_calls, Calls(DEV_TEACHER) as teacher_calls:
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, disable=True,
                      attention_kwargs={"scale": 0.9}, teacher_attention_kwargs={"scale": 0.7})
    assert [kw["joint_attention_kwargs"] for kw in student_calls.kwargs] == [{"scale": 0.9}] * 2
    assert [kw["joint_attention_kwargs"] for kw in teacher_calls.kwargs] == [{"scale": 0.7}]
    with pytest.raises(TypeError, match="attention_kwargs must be a dict of attention keyword arguments"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, attention_kwargs=0.5)


def test_no_teacher_model_for_runs_that_never_call_it():
    """teacher_transformer=None where the teacher is never called (lam = 0, k = 0, guided_steps=[]), refused by name
    where it would be."""
    options = dict(seeds=SEEDS, height=32, width=32, disable=True)
    want = flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, lam=0.0, **options)
    for unguided in ({"lam": 0.0}, {"k": 0}, {"guided_steps": []}):
        torch.testing.assert_close(flux.generate(SCHNELL, None, FLUX_COND, **unguided, **options), want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"teacher_transformer is None, but this run calls the teacher \(lam=0.1 on k=1\)"):
        flux.generate(SCHNELL, None, FLUX_COND, **options)
    with pytest.raises(ValueError, match=r"teacher_transformer is None.*guided_steps=\[1\]"):
        sd3.generate(LARGE_TURBO, None, SD3_COND, guided_steps=[1], **options)


def test_the_body_samples_in_stages_as_in_one_go():
    """kdpp.diffusers.sampling.sample from start to stop with the state x of the stage before (what a pipeline needs
    to edit latents between steps) gives the run in one go: stochastic Euler ancestral steps, random renoising,
    k = 2 guided steps counted on the whole schedule; latents= the seeded noise gives the seeded run."""
    from kdpp.diffusers import sampling
    from kdpp.noise import initial_noise

    preset = dataclasses.replace(flow_presets.flux_schnell(4), sampler="euler_ancestral")
    family = flux.FluxFamily(SCHNELL, DEV_TEACHER, FLUX_COND, preset, height=32, width=32)
    with Calls(DEV_TEACHER) as calls:
        whole = sampling.sample(family, seeds=SEEDS, k=2, disable=True)
        assert len(calls.kwargs) == 2
        x = None
        for start, stop in ((0, 1), (1, 3), (3, 4)):
            x = sampling.sample(family, seeds=SEEDS, x=x, start=start, stop=stop, k=2, disable=True)
        assert len(calls.kwargs) == 4
    torch.testing.assert_close(x, whole, rtol=0, atol=0)
    given = sampling.sample(family, seeds=SEEDS, latents=initial_noise(SEEDS, (2, *family.shape)), k=2, disable=True)
    torch.testing.assert_close(given, whole, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"start=1 needs x"):
        sampling.sample(family, seeds=SEEDS, start=1)
    with pytest.raises(ValueError, match="pass latents .* or x .*, not both"):
        sampling.sample(family, seeds=SEEDS, latents=whole, x=whole, start=1)
    with pytest.raises(ValueError, match=r"0 <= start < stop <= 4 .* got start=2, stop=2"):
        sampling.sample(family, seeds=SEEDS, x=whole, start=2, stop=2)
    with pytest.raises(ValueError, match=r"latents must be a tensor of shape \(2, 4, 4, 4\)"):
        sampling.sample(family, seeds=SEEDS, latents=whole[:1])


# ------------------------------------------------------------------ seeds, dtypes


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_per_image_seeds_are_batch_independent(family):
    generate, student, teacher, cond, preset = (
        (flux.generate, SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.flux_schnell(4)) if family == "flux"
        else (sd3.generate, LARGE_TURBO, LARGE, SD3_COND, flow_presets.sd35_large_turbo(4)))
    batch = generate(student, teacher, cond, preset, seeds=[7, 8], height=64, width=64, lam=0.5, k=2, disable=True)
    single = generate(student, teacher, FlowConditioning(*(t[1:] for t in dataclasses.astuple(cond))), preset,
                      seeds=[8], height=64, width=64, lam=0.5, k=2, disable=True)
    torch.testing.assert_close(batch[1:], single, rtol=1e-5, atol=1e-5)
    assert rel(batch[:1], single) > 0.1


@pytest.mark.parametrize("family, dtype", [("flux", torch.bfloat16), ("sd3", torch.bfloat16), ("sd3", torch.float16)])
def test_half_precision_calls_the_models_at_the_float32_timesteps(family, dtype):
    generate, student, teacher, cond, preset = (
        (flux.generate, SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.flux_schnell(4)) if family == "flux"
        else (sd3.generate, LARGE_TURBO, LARGE, SD3_COND, flow_presets.sd35_large_turbo(4)))
    recorded = {}
    for name, (s, t) in {"fp32": (student, teacher), "half": (copy.deepcopy(student).to(dtype), copy.deepcopy(teacher).to(dtype))}.items():
        with Calls(s) as sc, Calls(t) as tc:
            out = generate(s, t, cond, preset, seeds=SEEDS, height=64, width=64, lam=0.5, k=2, disable=True)
        recorded[name] = (out, sc.kwargs, tc.kwargs)
    (out32, s32, t32), (out16, s16, t16) = recorded["fp32"], recorded["half"]
    assert len(s16) == len(s32) == 4 and len(t16) == len(t32) == 2
    for a, b in zip(s32 + t32, s16 + t16):
        assert torch.equal(a["timestep"], b["timestep"]) and a["timestep"].dtype == torch.float32
        assert b["hidden_states"].dtype == dtype and b["encoder_hidden_states"].dtype == dtype
        if "guidance" in a:
            assert (a["guidance"] is None and b["guidance"] is None) or torch.equal(a["guidance"], b["guidance"])
    assert out16.dtype == torch.float32 and torch.isfinite(out16).all()
    assert rel(out16, out32) < 0.1


# ------------------------------------------------------------------ refusals


def test_latent_space_mismatches_are_refused():
    schnell = flow_presets.flux_schnell(2)
    with pytest.raises(ValueError, match="teacher_transformer is not a FluxPipeline"):
        flux.generate(SCHNELL, LARGE, FLUX_COND, schnell, seeds=SEEDS, height=64, width=64)
    with pytest.raises(ValueError, match="student_transformer is not a StableDiffusion3Pipeline"):
        sd3.generate(SCHNELL, LARGE, SD3_COND, seeds=SEEDS, height=64, width=64)
    with pytest.raises(ValueError, match="latent spaces differ: student_transformer takes 4 latent channels, teacher_transformer 16"):
        flux.generate(SCHNELL, tiny_flux(guidance_embeds=True, in_channels=64), FLUX_COND, schnell, seeds=SEEDS, height=64, width=64)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16 \(FLUX"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, schnell, seeds=SEEDS, height=72, width=64)
    with pytest.raises(ValueError, match=r"width must be a positive multiple of 8 \(SD3"):
        sd3.generate(LARGE_TURBO, LARGE, SD3_COND, seeds=SEEDS, height=64, width=60)
    with pytest.raises(ValueError, match="preset 'sd3.5-large-turbo-4step' is a 'sd3' preset"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.sd35_large_turbo(), seeds=SEEDS, height=64, width=64)
    with pytest.raises(ValueError, match="vae has 16 latent channels, the transformers take 4"):
        vae = type("VAE", (), {"config": type("C", (), {"latent_channels": 16})(), "decode": lambda self, z: z})()
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, schnell, seeds=SEEDS, height=64, width=64, vae=vae)
    model = flux.FluxVelocity(SCHNELL, "student_transformer")
    with pytest.raises(ValueError, match=r"takes latents \[B, 4, h, w\] \(its in_channels 16\), got shape \(2, 16, 16\)"):
        model(torch.zeros(2, 16, 16), torch.ones(2))  # already packed
    with pytest.raises(ValueError, match="2x2 patches: height and width must be even"):
        model(torch.zeros(2, 4, 7, 8), torch.ones(2))


def test_guidance_embedding_mismatches_and_batches_are_refused():
    with pytest.raises(ValueError, match="student_transformer has a guidance embedding"):
        flux.generate(DEV, DEV_TEACHER, FLUX_COND, flow_presets.flux_schnell(2), seeds=SEEDS, height=64, width=64)
    with pytest.raises(ValueError, match="teacher_transformer has no guidance embedding, but its preset sets guidance=3.5"):
        flux.generate(SCHNELL, SCHNELL, FLUX_COND, flow_presets.flux_schnell(2), seeds=SEEDS, height=64, width=64)
    with pytest.raises(ValueError, match="conditioning.prompt_embeds has batch 2, seeds has 3"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.flux_schnell(2), seeds=[1, 2, 3], height=64, width=64)
    stochastic = {**flow_presets.FLUX_SCHNELL_SCHEDULER, "stochastic_sampling": True}
    with pytest.raises(ValueError, match="scheduler_config sets stochastic_sampling .* samples with 'euler'"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.flux_schnell(2), seeds=SEEDS, height=64, width=64,
                      scheduler_config=stochastic)
    no_negative = FlowConditioning(SD3_COND.prompt_embeds, pooled_prompt_embeds=SD3_COND.pooled_prompt_embeds)
    with pytest.raises(ValueError, match="teacher_conditioning has no negative prompt embeddings, but .* true CFG"):
        sd3.generate(LARGE_TURBO, LARGE, no_negative, seeds=SEEDS, height=64, width=64)


def test_importing_the_flow_modules_does_not_import_diffusers(fresh_python):
    code = ("import sys, kdpp.diffusers.sd3, kdpp.diffusers.flux, kdpp.diffusers.flow_presets; "
            "print('diffusers' in sys.modules)")
    run = fresh_python(["-c", code])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "False"


def test_presets():
    turbo, schnell, lora = flow_presets.sd35_large_turbo(), flow_presets.flux_schnell(), flow_presets.flux_dev_lora()
    assert (turbo.steps, turbo.teacher.cfg_scale, turbo.cfg_scale, turbo.guidance) == (4, 3.5, 1.0, None)
    assert (schnell.steps, schnell.teacher.guidance, schnell.guidance) == (4, 3.5, None)
    assert (lora.steps, lora.guidance, lora.teacher.name) == (8, 3.5, "flux.1-dev")
    assert lora.scheduler_config["use_dynamic_shifting"] and not schnell.scheduler_config["use_dynamic_shifting"]
    assert all(p.sampler == "euler" for p in (turbo, schnell, lora))
    # the documented default: the safest setting measured on the digits students (docs/learned.md)
    assert all((p.lam, p.k, p.renoise) == (0.1, 1, "random") for p in (turbo, schnell, lora, flow_presets.wan21_lightx2v()))
    with pytest.raises(ValueError, match="FLUX.1-schnell is meant for 1 to 4 steps, got steps=8"):
        flow_presets.flux_schnell(8)
    assert set(flow_presets.STUDENTS) == {"sd3.5-large-turbo", "flux.1-schnell", "flux.1-dev-lora", "wan2.1-lightx2v"}


# ------------------------------------------------------------------ images


def test_images_are_the_flux_pipelines():
    """With a VAE (8x, with a shift factor), generate's images are the pipeline's images."""
    torch.manual_seed(8)
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                  block_out_channels=(4,) * 4, layers_per_block=1, latent_channels=4, norm_num_groups=2,
                                  sample_size=64, scaling_factor=1.5035, shift_factor=0.0609).eval()
    preset = flow_presets.flux_schnell(2)
    pipe = flux_pipeline(SCHNELL, preset)
    pipe.register_modules(vae=vae)
    pipe.vae_scale_factor = 8
    pipe.image_processor = diffusers.image_processor.VaeImageProcessor(vae_scale_factor=16)
    want = pipe(prompt_embeds=FLUX_COND.prompt_embeds, pooled_prompt_embeds=FLUX_COND.pooled_prompt_embeds, height=64,
                width=64, num_inference_steps=2, guidance_scale=0.0, generator=generators()).images
    got = flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, lam=0.0, vae=vae,
                        disable=True)
    assert [im.size for im in got] == [im.size for im in want] == [(64, 64)] * 2
    for a, b in zip(got, want):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1


def test_flux_dev_lora_student_on_the_teachers_own_transformer():
    """flux_dev_lora with kdpp.diffusers.lora's one-model pair: lam = 0 is FluxPipeline with the LoRA active; the
    teacher calls run the same transformer with its adapters off."""
    lora = pytest.importorskip("kdpp.diffusers.lora", reason="needs kdpp.diffusers.lora (the one-model LoRA pair)")
    peft = pytest.importorskip("peft")
    base = tiny_flux(5, guidance_embeds=True)
    torch.manual_seed(6)
    base.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pair = lora.SharedLoRAModel(base)
    preset = flow_presets.flux_dev_lora(4)
    want = flux_pipeline(base, preset)(
        prompt_embeds=FLUX_COND.prompt_embeds, pooled_prompt_embeds=FLUX_COND.pooled_prompt_embeds, height=64, width=64,
        num_inference_steps=4, guidance_scale=3.5, output_type="latent", generator=generators()).images
    got = flux.generate(pair.student, pair.teacher, FLUX_COND, preset, seeds=SEEDS, height=64, width=64, lam=0.0,
                        disable=True)
    assert rel(got, FluxPipeline._unpack_latents(want, 64, 64, 8)) < 1e-5
    _, steps, calls = guided_run(flux.generate, pair.student, pair.teacher, FLUX_COND, preset, k=1)
    assert len(steps) == 4 and "teacher_denoised" in steps[0]
    assert len(calls) == 5  # the hook is on the one shared transformer: 4 student calls, the teacher's second
    kw = calls[1]
    with torch.no_grad():
        base.disable_adapters()
        v_base = base(**kw)[0]
        base.enable_adapters()
        v_lora = base(**kw)[0]
    t = kw["timestep"][0]
    x_rf = FluxPipeline._unpack_latents(kw["hidden_states"], 64, 64, 8)
    torch.testing.assert_close(steps[0]["teacher_denoised"], x_rf - t * FluxPipeline._unpack_latents(v_base, 64, 64, 8),
                               rtol=1e-5, atol=1e-5)
    assert rel(v_lora, v_base) > 1e-3  # the adapters matter


# ------------------------------------------------------------------ conditioning, one-step presets, argument checks


def test_flow_conditioning_takes_the_pipelines_encode_prompt_returns():
    """FlowConditioning(*StableDiffusion3Pipeline.encode_prompt(...)) and FlowConditioning.from_flux(
    *FluxPipeline.encode_prompt(...)), with diffusers' real encode_prompt on tiny text encoders."""
    from tiny_diffusers import tiny_flux_text_pipeline, tiny_sd3_text_pipeline

    with torch.no_grad():
        out = tiny_sd3_text_pipeline(LARGE).encode_prompt(["a fox", "a cat"], None, None, do_classifier_free_guidance=True,
                                                          max_sequence_length=9)
    cond = FlowConditioning(*out)
    assert (cond.prompt_embeds, cond.negative_prompt_embeds, cond.pooled_prompt_embeds,
            cond.negative_pooled_prompt_embeds) == out
    latents = sd3.generate(LARGE_TURBO, LARGE, cond, flow_presets.sd35_large_turbo(2), seeds=SEEDS, height=32, width=32,
                           disable=True)
    assert latents.shape == (2, 4, 4, 4) and torch.isfinite(latents).all()
    with pytest.raises(ValueError, match=r"FlowConditioning.negative_prompt_embeds must be \[batch, tokens, dim\], got shape \(2, 64\)"):
        FlowConditioning(out[0], out[2], out[1], out[3])  # pooled and negative swapped

    with torch.no_grad():
        flux_out = tiny_flux_text_pipeline(SCHNELL).encode_prompt(["a fox", "a cat"], None, max_sequence_length=12)
    assert len(flux_out) == 3 and flux_out[2].shape == (12, 3)
    cond = FlowConditioning.from_flux(*flux_out)
    assert cond.prompt_embeds is flux_out[0] and cond.pooled_prompt_embeds is flux_out[1] and not cond.has_negative
    latents = flux.generate(SCHNELL, DEV_TEACHER, cond, flow_presets.flux_schnell(2), seeds=SEEDS, height=32, width=32,
                            disable=True)
    assert latents.shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="text_ids must be FluxPipeline.encode_prompt's zero"):
        FlowConditioning.from_flux(flux_out[0], flux_out[1], torch.ones(12, 3))


def test_flow_conditioning_shape_errors():
    e, p = torch.randn(2, 7, 32), torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"FlowConditioning.pooled_prompt_embeds must be \[batch, dim\]"):
        FlowConditioning(e, pooled_prompt_embeds=e)
    with pytest.raises(TypeError, match="FlowConditioning.pooled_prompt_embeds must be a tensor"):
        FlowConditioning(e)
    with pytest.raises(ValueError, match="needs negative_prompt_embeds and negative_pooled_prompt_embeds, or none of them"):
        FlowConditioning(e, e, p)
    with pytest.raises(ValueError, match="negative_prompt_embeds has shape"):
        FlowConditioning(e, e[..., :16], p, p)  # another width (another token count is taken: two CFG passes)
    assert FlowConditioning(e, e[:, :3], p, p).negative_prompt_embeds.shape[1] == 3
    with pytest.raises(ValueError, match="pooled_prompt_embeds has batch 1, prompt_embeds 2"):
        FlowConditioning(e, pooled_prompt_embeds=p[:1])
    wide = FlowConditioning(torch.randn(2, 7, 16), pooled_prompt_embeds=p)
    with pytest.raises(ValueError, match=r"conditioning.prompt_embeds has width 16, student_transformer takes 32 \(its config.joint_attention_dim\)"):
        flux.generate(SCHNELL, DEV_TEACHER, wide, seeds=SEEDS, height=32, width=32)


class TransformerCalls:
    """Counts a transformer's forward calls while in a ``with`` block."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __enter__(self):
        self.handle = self.model.register_forward_pre_hook(lambda m, args: setattr(self, "calls", self.calls + 1))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("make, family", [
    (lambda: flow_presets.flux_schnell(1), "flux"), (lambda: flow_presets.sd35_large_turbo(1), "sd3"),
    (lambda: flow_presets.flux_dev_lora(1), "flux")], ids=["flux_schnell", "sd35_large_turbo", "flux_dev_lora"])
def test_one_step_flow_presets_call_the_teacher(make, family):
    """One-step flow presets call the teacher once; renoise_sigma='next' renoises to level 0, calls none and warns."""
    preset = make()
    generate, student, teacher, cond = ((flux.generate, DEV if preset.guidance else SCHNELL, DEV_TEACHER, FLUX_COND)
                                        if family == "flux" else (sd3.generate, LARGE_TURBO, LARGE, SD3_COND))
    assert preset.renoise == "random"
    options = dict(seeds=SEEDS, height=32, width=32, disable=True)
    with TransformerCalls(teacher) as calls:
        plain = generate(student, teacher, cond, preset, lam=0.0, **options)
        assert calls.calls == 0
        guided = generate(student, teacher, cond, preset, **options)
        assert calls.calls == 1 and rel(plain, guided) > 1e-3
        generate(student, teacher, cond, preset, renoise="random", **options)
        assert calls.calls == 2
        with pytest.warns(UserWarning, match=r"the teacher is never called.*renoise_sigma='auto' guides them"):
            generate(student, teacher, cond, preset, renoise="random", renoise_sigma="next", **options)
        assert calls.calls == 2


def test_guiding_the_last_flow_step_calls_the_teacher_unless_renoise_sigma_is_next():
    options = dict(seeds=SEEDS, height=32, width=32, disable=True)
    preset = flow_presets.flux_schnell(4)
    with TransformerCalls(DEV_TEACHER) as calls:
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, preset, guided_steps=[-1], **options)
        assert calls.calls == 1
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, preset, k=4, **options)
        assert calls.calls == 5
        with pytest.warns(UserWarning, match=r"guided step\(s\) \[3\] call no teacher"):
            flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, preset, guided_steps=[-1], renoise_sigma="next", **options)
        assert calls.calls == 5


@pytest.mark.parametrize("height, width, error, message", [
    (0, 32, ValueError, "height must be a positive multiple of 16"), (32, -16, ValueError, "width must be a positive"),
    (32.0, 32, TypeError, "height must be an int"), (40, 32, ValueError, "height must be a positive multiple of 16")])
def test_flux_refuses_bad_image_sizes(height, width, error, message):
    with pytest.raises(error, match=message):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, seeds=SEEDS, height=height, width=width)


@pytest.mark.parametrize("seeds, error, message", [
    (11, TypeError, r"got the int 11 \(pass \[11\]"), ([11.5, 12], TypeError, r"seeds\[0\] must be an int"),
    ("ab", TypeError, "seeds must be a sequence of ints"), ([2**70, 1], ValueError, "out of torch.Generator's range")])
def test_flow_generate_refuses_bad_seeds(seeds, error, message):
    with pytest.raises(error, match=message):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, seeds=seeds, height=32, width=32)


def test_flow_presets_and_arguments_are_type_checked():
    for bad in (2.5, "4", True):
        with pytest.raises(TypeError, match="steps must be an int"):
            flow_presets.flux_schnell(bad)
    with pytest.raises(TypeError, match="steps must be an int"):
        flow_presets.sd35_large_turbo(4.0)
    with pytest.raises(ValueError, match=r"FlowStudentPreset.sampler must be one of kdpp.SAMPLERS .* got 'eular'"):
        dataclasses.replace(flow_presets.flux_schnell(), sampler="eular")
    from kdpp.diffusers.presets import lightning
    from kdpp.diffusers.sdxl import SDXLConditioning

    options = dict(seeds=SEEDS, height=32, width=32)
    with pytest.raises(TypeError, match="preset must be a FlowStudentPreset, got StudentPreset"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, lightning(4), **options)
    with pytest.raises(TypeError, match="preset must be a FlowStudentPreset, got str"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, "flux.1-schnell", **options)
    with pytest.raises(TypeError, match="preset must be a FlowStudentPreset, got FlowTeacherPreset"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.FLUX_DEV, teacher=flow_presets.flux_schnell(), **options)
    with pytest.raises(TypeError, match="teacher must be a FlowTeacherPreset, got FlowStudentPreset"):
        flux.generate(SCHNELL, DEV_TEACHER, FLUX_COND, flow_presets.flux_schnell(), teacher=flow_presets.flux_schnell(),
                      **options)
    sdxl_cond = SDXLConditioning(torch.randn(2, 7, 32), torch.randn(2, 7, 32), torch.randn(2, 32), torch.randn(2, 32))
    with pytest.raises(TypeError, match="conditioning must be a FlowConditioning, got SDXLConditioning"):
        flux.generate(SCHNELL, DEV_TEACHER, sdxl_cond, **options)


def test_sd3_needs_negatives_only_when_the_cfg_teacher_is_called():
    no_negative = FlowConditioning(SD3_COND.prompt_embeds, pooled_prompt_embeds=SD3_COND.pooled_prompt_embeds)
    options = dict(seeds=SEEDS, height=32, width=32, disable=True)
    for unguided in ({"lam": 0.0}, {"k": 0}, {"guided_steps": []}):
        sd3.generate(LARGE_TURBO, LARGE, no_negative, **unguided, **options)
    with pytest.raises(ValueError, match=r"teacher_conditioning has no negative prompt embeddings, but teacher_transformer .*cfg_scale 3.5"):
        sd3.generate(LARGE_TURBO, LARGE, no_negative, **options)
