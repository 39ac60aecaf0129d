"""The SDXL family: kdpp's VP adapter, presets and generate against diffusers' own schedulers and StableDiffusionXLPipeline,
on a tiny SDXL-architecture UNet."""
import copy
import numpy
import os
import warnings

import pytest
import torch

import kdpp
from kdpp.diffusers.presets import dmd2, lcm, lcm_timesteps, lightning, sdxl_teacher, turbo
from kdpp.diffusers.sdxl import SDXLConditioning, check_shared_latent_space, generate, time_ids
from kdpp.diffusers.vp import EpsilonSpaceGuidance, VPDenoiser, guidance_scale_embedding

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
from tiny_diffusers import BETAS, tiny_sdxl_text_pipeline, tiny_unet  # noqa: E402


def conditioning(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"encoder_hidden_states": torch.randn(batch, 7, 64, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(batch, 32, generator=g),
                                  "time_ids": time_ids(64, 64).expand(batch, -1)}}


UNET = tiny_unet()
KW = conditioning()
NOISE = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))


def replay(seed):
    g = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(NOISE.shape, generator=g)


def run_diffusers(scheduler, steps, model_kwargs, generator=None, scale_input=True):
    scheduler.set_timesteps(steps)
    latents = NOISE * scheduler.init_noise_sigma
    denoised = None
    with torch.no_grad():
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(latents, t) if scale_input else latents
            out = UNET(inp, t, **model_kwargs).sample
            step = scheduler.step(out, t, latents, **({"generator": generator} if generator is not None else {}), return_dict=False)
            latents, denoised = step[0], (step[1] if len(step) > 1 else None)
    return latents, denoised


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_euler_trailing_is_diffusers_euler_discrete(prediction):
    sched = diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing", prediction_type=prediction)
    want, _ = run_diffusers(sched, 4, KW)
    preset = lightning(4)
    torch.testing.assert_close(preset.sigmas().float(), sched.sigmas, rtol=1e-6, atol=1e-6)
    x = NOISE * preset.initial_noise_scale()
    assert preset.initial_noise_scale() == pytest.approx(float(sched.init_noise_sigma), rel=1e-6)
    got = kdpp.sample_euler_distpp(VPDenoiser(UNET, sched.alphas_cumprod, prediction), None, x, sched.sigmas, 0.0,
                                   extra_args=KW, disable=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_euler_ancestral_is_diffusers_euler_ancestral():
    sched = diffusers.EulerAncestralDiscreteScheduler(**BETAS, timestep_spacing="trailing")
    want, _ = run_diffusers(sched, 4, KW, generator=torch.Generator().manual_seed(5))
    x = NOISE * turbo(4).initial_noise_scale()
    got = kdpp.sample_euler_ancestral_distpp(VPDenoiser(UNET, sched.alphas_cumprod), None, x, sched.sigmas, 0.0,
                                             extra_args=KW, noise_sampler=replay(5), disable=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("steps", [2, 4, 8])
def test_multistep_consistency_is_diffusers_lcm_scheduler(steps):
    sched = diffusers.LCMScheduler(**BETAS)
    sched.set_timesteps(steps)
    assert lcm_timesteps(steps) == tuple(int(t) for t in sched.timesteps)
    unet_kw = {**KW}
    _, want = run_diffusers(sched, steps, unet_kw, generator=torch.Generator().manual_seed(6), scale_input=False)
    preset = lcm(steps)
    x = NOISE * preset.initial_noise_scale()
    got = kdpp.sample_lcm_distpp(VPDenoiser(UNET, sched.alphas_cumprod, lcm_boundary={}), None, x, preset.sigmas(), 0.0,
                                 extra_args=KW, noise_sampler=replay(6), disable=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_dpmpp_2m_is_diffusers_dpm_solver_multistep():
    sched = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2)
    want, _ = run_diffusers(sched, 6, KW)
    x = NOISE * (1 + sched.sigmas[0] ** 2) ** 0.5
    got = kdpp.sample_dpmpp_2m_distpp(VPDenoiser(UNET, sched.alphas_cumprod), None, x, sched.sigmas, 0.0,
                                      extra_args=KW, disable=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_lcm_guidance_embedding():
    """VDM's sinusoidal embedding of 1000 (w - 1), as LCM pipelines build timestep_cond."""
    emb = guidance_scale_embedding(1.0, 32, batch=2)
    assert emb.shape == (2, 32) and torch.equal(emb[:, :16], torch.zeros(2, 16)) and torch.equal(emb[:, 16:], torch.ones(2, 16))
    e = guidance_scale_embedding(8.0, 33)
    assert e.shape == (1, 33) and e[0, -1] == 0
    assert e[0, 0] == pytest.approx(torch.sin(torch.tensor(7000.0)).item(), abs=1e-4)


def test_cfg_batched_equals_two_calls_with_sdxl_conditioning():
    den = VPDenoiser(UNET, diffusers.EulerDiscreteScheduler(**BETAS).alphas_cumprod)
    c, u = conditioning(seed=1), conditioning(seed=3)
    x, sigma = NOISE * 4.0, torch.full((2,), 4.08)
    with torch.no_grad():
        batched = kdpp.CFGDenoiser(den, 7.5)(x, sigma, cond=c, uncond=u)
        dc, du = den(x, sigma, **c), den(x, sigma, **u)
    torch.testing.assert_close(batched, du + 7.5 * (dc - du), rtol=0, atol=1e-4)


def test_v_prediction_forwards_every_kwarg_and_timestep_modes():
    seen = {}

    def model(x_vp, t, **kwargs):
        seen.update(kwargs, t=t)
        return torch.zeros_like(x_vp)

    a = kdpp.schedules.scaled_linear_alphas_cumprod()
    den = VPDenoiser(model, a, "v_prediction")
    x, sigma = torch.ones(2, 3), torch.tensor([4.0817, 4.0817])
    out = den(x, sigma, encoder_hidden_states=1, added_cond_kwargs={"time_ids": 2})
    assert seen["encoder_hidden_states"] == 1 and seen["added_cond_kwargs"] == {"time_ids": 2}
    assert seen["t"].tolist() == [749.0, 749.0]
    torch.testing.assert_close(out, x / (1 + 4.0817**2))  # v = 0: x0 = x_vp / sqrt(1 + sigma^2)
    cont = VPDenoiser(model, a, timestep="continuous")
    t = torch.tensor([10.25, 500.5, 998.75])
    torch.testing.assert_close(cont.sigma_to_t(cont.t_to_sigma(t)), t, rtol=0, atol=1e-3)
    with pytest.raises(ValueError, match="prediction must be one of"):
        VPDenoiser(model, a, "flow")


def test_presets():
    assert lightning(4).timesteps == (999, 749, 499, 249) and lightning(1).prediction == "sample"
    assert turbo(2).sampler == "euler_ancestral" and turbo(2).resolution == 512
    one = dmd2(1)
    assert one.timesteps == (399,) and one.initial_noise_scale() == pytest.approx((1 + float(one.sigmas()[0]) ** 2) ** 0.5)
    assert sdxl_teacher("dpmpp_2s_ancestral").cfg_scale == 6.0 and sdxl_teacher().cfg_scale == 7.5
    with pytest.raises(ValueError, match="1, 2, 4 and 8 steps"):
        lightning(3)


def test_latent_space_mismatch_is_refused():
    with pytest.raises(ValueError, match="in_channels 4 vs 8"):
        check_shared_latent_space(UNET, tiny_unet(in_channels=8))
    vae_a = diffusers.AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32)
    vae_b = diffusers.AutoencoderKL(block_out_channels=(32,), latent_channels=4, norm_num_groups=32, scaling_factor=0.5)
    with pytest.raises(ValueError, match="VAE scaling_factor"):
        check_shared_latent_space(UNET, UNET, vae_a, vae_b)


def test_generate_end_to_end_with_per_image_seeds():
    g = torch.Generator().manual_seed(0)
    cond = SDXLConditioning(torch.randn(3, 7, 64, generator=g), torch.randn(3, 7, 64, generator=g),
                            torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g))
    teacher = tiny_unet(seed=1)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32).eval()
    images = generate(UNET, teacher, cond, lightning(4), seeds=[10, 11, 12], height=128, width=128, lam=0.5,
                      dtype=torch.float32, vae=vae, disable=True)
    assert len(images) == 3 and images[0].size == (32, 32)
    lat = generate(UNET, teacher, cond, dmd2(4), seeds=[10, 11, 12], height=128, width=128, dtype=torch.float32, disable=True)
    part = generate(UNET, teacher, SDXLConditioning(*(t[1:2] for t in (cond.prompt_embeds, cond.negative_prompt_embeds,
                    cond.pooled_prompt_embeds, cond.negative_pooled_prompt_embeds))), dmd2(4), seeds=[11],
                    height=128, width=128, dtype=torch.float32, disable=True)
    torch.testing.assert_close(lat[1:2], part, rtol=0, atol=1e-4)  # an image does not depend on its batch


@pytest.mark.gpu
def test_full_size_sdxl_unet_guided_step_costs_one_teacher_call_fp16():
    """Random-weight full-size SDXL UNet in fp16: guided step / student step wall time and peak memory."""
    import time

    cfg = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
               cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816)
    unet = diffusers.UNet2DConditionModel(**cfg).half().cuda().eval()
    den = VPDenoiser(unet, kdpp.schedules.scaled_linear_alphas_cumprod())
    kw = {"encoder_hidden_states": torch.randn(1, 77, 2048).half().cuda(),
          "added_cond_kwargs": {"text_embeds": torch.randn(1, 1280).half().cuda(), "time_ids": time_ids(1024, 1024).half().cuda()}}
    teacher = kdpp.CFGDenoiser(den, 7.5)
    targs = {"cond": kw, "uncond": kw}
    x = torch.randn(1, 4, 128, 128).half().cuda() * 14.6
    sig = lightning(4).sigmas()

    def timed(lam, k):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        kdpp.sample_euler_distpp(den, teacher, x, sig, lam, k, extra_args=kw, teacher_extra_args=targs, disable=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(0.0, 0)
    plain, guided = min(timed(0.0, 0) for _ in range(3)), min(timed(0.5, 1) for _ in range(3))
    print(f"4 student steps {plain:.3f}s, 4 + 1 guided {guided:.3f}s, ratio {guided / plain:.2f}, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    assert guided / plain < 1.75  # one batched CFG teacher call on top of four student calls


@pytest.mark.skipif(not os.environ.get("KDPP_SDXL_BASE") or not os.environ.get("KDPP_STUDENT_UNET"),
                    reason="real weights: set KDPP_SDXL_BASE (SDXL base folder) and KDPP_STUDENT_UNET (student UNet folder)")
def test_real_weights_lightning_with_sdxl_teacher():
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(os.environ["KDPP_SDXL_BASE"], local_files_only=True)
    student = diffusers.UNet2DConditionModel.from_pretrained(os.environ["KDPP_STUDENT_UNET"], local_files_only=True)
    emb = pipe.encode_prompt(["a cat patting a dog"], do_classifier_free_guidance=True)
    images = generate(student, pipe.unet, SDXLConditioning(*emb), lightning(4), seeds=[0], vae=pipe.vae,
                      dtype=torch.float32, disable=True)
    assert images[0].size == (1024, 1024)


def test_paper_setup_script_explains_missing_weights(tmp_path, capsys):
    module = load_paper_setup()
    (tmp_path / "p.txt").write_text("a cat\n")
    assert module.main(["--base", str(tmp_path / "none"), "--student", str(tmp_path), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "is not a local folder" in capsys.readouterr().err


# ------------------------------------------------------------------ the SDXL family: conditioning, timesteps, dtypes


def test_sdxl_conditioning_takes_encode_prompt_return_order():
    """SDXLConditioning(*pipe.encode_prompt(...)) with diffusers' real encode_prompt."""
    pipe = tiny_sdxl_text_pipeline()
    with torch.no_grad():
        out = pipe.encode_prompt(["a cat", "a dog"], device="cpu", do_classifier_free_guidance=True,
                                 negative_prompt=["blurry", "ugly"])
    cond = SDXLConditioning(*out)
    assert cond.prompt_embeds is out[0] and cond.negative_prompt_embeds is out[1]
    assert cond.pooled_prompt_embeds is out[2] and cond.negative_pooled_prompt_embeds is out[3]
    assert cond.pooled_prompt_embeds.shape == (2, 32) and cond.prompt_embeds.shape == (2, 77, 64)
    lat = generate(UNET, tiny_unet(seed=1), cond, lightning(2), seeds=[0, 1], height=64, width=64,
                   dtype=torch.float32, disable=True)
    assert lat.shape == (2, 4, 8, 8) and torch.isfinite(lat).all()
    with pytest.raises(ValueError, match=r"SDXLConditioning.negative_prompt_embeds must be \[batch, tokens, dim\].*encode_prompt's order"):
        SDXLConditioning(out[0], out[2], out[1], out[3])  # pooled and negative swapped
    with pytest.raises(ValueError, match="negative_pooled_prompt_embeds has shape"):
        SDXLConditioning(out[0], out[1], out[2], out[3][:, :16])
    with pytest.raises(TypeError, match="pooled_prompt_embeds must be a tensor"):
        SDXLConditioning(out[0], out[1], None, out[3])


class RecordingUNet:
    """Wraps a UNet; records each call's timestep tensor and time_ids."""

    def __init__(self, unet):
        self.unet, self.calls = unet, []

    def __getattr__(self, name):  # config, device, ... of the UNet
        if name.startswith("_") or name == "unet":
            raise AttributeError(name)
        return getattr(self.unet, name)

    def __call__(self, x_vp, t, **kwargs):
        self.calls.append((t.clone(), kwargs["added_cond_kwargs"]["time_ids"].clone()))
        return self.unet(x_vp, t, **kwargs)

    def timesteps(self):
        return [sorted(set(t.tolist())) for t, _ in self.calls]


HALF_UNETS = {dtype: (copy.deepcopy(UNET).to(dtype), tiny_unet(seed=1).to(dtype)) for dtype in (torch.float16, torch.bfloat16)}
PRESETS = [lightning(1), lightning(2), lightning(4), lightning(8), turbo(4), dmd2(1), dmd2(4), lcm(4)]


def test_vp_denoiser_timestep_is_exact_for_float32_sigma_with_half_x():
    """With sigma in float32 every training timestep is hit whatever x's dtype; the output keeps
    x's dtype even when the model answers in float32."""
    a = kdpp.schedules.scaled_linear_alphas_cumprod()
    seen = []

    def model(x_vp, t, **kwargs):
        seen.append(t)
        return torch.zeros(x_vp.shape, dtype=torch.float32)

    sigmas = kdpp.schedules.vp_sigmas(a).float()
    for dtype in (torch.float16, torch.bfloat16):
        for prediction in ("epsilon", "sample"):
            den = VPDenoiser(model, a, prediction, lcm_boundary={})
            out = den(torch.ones(1000, 2, dtype=dtype), sigmas)
            assert out.dtype == dtype and seen[-1].dtype == torch.float32
            assert seen[-1].tolist() == list(range(1000))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("preset", PRESETS, ids=[p.name for p in PRESETS])
def test_generate_calls_unets_at_the_preset_timesteps_in_half_precision(preset, dtype):
    """In fp16 and bf16, generate calls the student at exactly the preset's timesteps and
    the teacher once, at the renoise level's timestep (one-step presets: the current one). Needs the core to hand
    models sigma in float32 for half x."""
    student, teacher = (RecordingUNet(u) for u in HALF_UNETS[dtype])
    cond = SDXLConditioning(*(torch.randn(*shape, generator=torch.Generator().manual_seed(j))
                              for j, shape in enumerate([(2, 7, 64), (2, 7, 64), (2, 32), (2, 32)])))
    generate(student, teacher, cond, preset, seeds=[0, 1], height=32, width=32, dtype=dtype, device="cpu", disable=True)
    assert all(t.dtype == torch.float32 for t, _ in student.calls + teacher.calls)
    assert student.timesteps() == [[t] for t in preset.timesteps]
    assert teacher.timesteps() == [[preset.timesteps[1 if len(preset.timesteps) > 1 else 0]]]


def test_generate_gives_student_and_teacher_time_ids_of_the_image_size():
    """Time_ids are (h, w) for both models at any size, as diffusers' pipelines pass them."""
    student, teacher = RecordingUNet(UNET), RecordingUNet(tiny_unet(seed=1))
    cond = SDXLConditioning(torch.randn(1, 7, 64), torch.randn(1, 7, 64), torch.randn(1, 32), torch.randn(1, 32))
    generate(student, teacher, cond, turbo(2), seeds=[0], height=96, width=128, dtype=torch.float32, disable=True)
    want = [96.0, 128.0, 0.0, 0.0, 96.0, 128.0]
    assert teacher.calls and all(ids.tolist() == [want] * len(ids) for _, ids in student.calls + teacher.calls)


@pytest.mark.parametrize("preset", [lightning(1), turbo(1), dmd2(1)], ids=lambda p: p.name)
def test_one_step_presets_call_the_teacher(preset):
    """One-step presets call the teacher once (its only step is a step to 0: the "auto" level is the current one);
    the next level (0) calls none and warns."""
    teacher = RecordingUNet(tiny_unet(seed=1))
    cond = SDXLConditioning(torch.randn(1, 7, 64), torch.randn(1, 7, 64), torch.randn(1, 32), torch.randn(1, 32))
    plain = generate(UNET, teacher, cond, preset, seeds=[0], height=64, width=64, lam=0.0, dtype=torch.float32, disable=True)
    assert preset.renoise == "random" and not teacher.calls
    guided = generate(UNET, teacher, cond, preset, seeds=[0], height=64, width=64, dtype=torch.float32, disable=True)
    assert len(teacher.calls) == 1 and not torch.equal(plain, guided)
    generate(UNET, teacher, cond, preset, seeds=[0], height=64, width=64, renoise="random", dtype=torch.float32,
             disable=True)
    assert len(teacher.calls) == 2
    with pytest.warns(UserWarning, match="teacher is never called"):
        generate(UNET, teacher, cond, preset, seeds=[0], height=64, width=64, renoise="random", renoise_sigma="next",
                 dtype=torch.float32, disable=True)
    assert len(teacher.calls) == 2


def test_presets_default_to_the_authors_guidance_strengths():
    """The authors' strengths: x0-space 0.1 for the Euler-family students, epsilon-space 0.01 for LCM/DMD2; k = 1."""
    for preset in (lightning(4), lightning(1), turbo(4)):
        assert (preset.lam, preset.k, preset.guidance_space) == (0.1, 1, "x0")
    for preset in (lcm(4), dmd2(4), dmd2(1)):
        assert (preset.lam, preset.k, preset.guidance_space) == (0.01, 1, "epsilon")


def replay_list(noises):
    it = iter(noises)
    return lambda sigma, sigma_next: next(it)


def sdxl_kwargs(cond, ids=time_ids(16, 16)):
    return cond.unet_kwargs(ids), {"cond": cond.unet_kwargs(ids), "uncond": cond.unet_kwargs(ids, negative=True)}


def test_epsilon_space_guidance_is_the_authors_random_pp_sampler_on_dmd2():
    """kdpp's LCM sampler with EpsilonSpaceGuidance (core lam = 1) is the authors' ``random++``
    DMD loop (latent_sdxl.py RandomppSolver), transcribed here in VP terms: eps = eps_S + lam (eps_T - eps_S), with
    the teacher (CFG 7.5) at the renoised point sqrt(a_next) z0 + sqrt(1 - a_next) xi and timestep t - 250."""
    a = kdpp.schedules.scaled_linear_alphas_cumprod().float()
    student_unet, teacher_unet = UNET, tiny_unet(seed=1)
    g = torch.Generator().manual_seed(3)
    cond = SDXLConditioning(torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g),
                            torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g))
    kw, tkw = sdxl_kwargs(cond)
    lam_eps, guide_step, timesteps = 0.01, 3, (999, 749, 499, 249)
    xi = [torch.randn(NOISE.shape, generator=g) for _ in range(guide_step)]
    z = [torch.randn(NOISE.shape, generator=g) for _ in range(3)]
    with torch.no_grad():  # the authors' loop, VP frame
        zt = NOISE.clone()
        for step, t in enumerate(timesteps):
            at = a[t]
            noise_s = student_unet(zt, torch.tensor(float(t)), **kw).sample
            z0t = (zt - (1 - at).sqrt() * noise_s) / at.sqrt()
            if step < guide_step:
                at_next = a[t - 250]
                z_re = at_next.sqrt() * z0t + (1 - at_next).sqrt() * xi[step]
                both = kdpp.cfg._cat(tkw["uncond"], tkw["cond"], "")
                eps_u, eps_c = teacher_unet(torch.cat([z_re, z_re]), torch.tensor(float(t - 250)), **both).sample.chunk(2)
                noise_pred = noise_s + lam_eps * (eps_u + 7.5 * (eps_c - eps_u) - noise_s)
                z0t = (zt - (1 - at).sqrt() * noise_pred) / at.sqrt()
            if step < len(timesteps) - 1:
                at_next = a[t - 250]
                zt = at_next.sqrt() * z0t + (1 - at_next).sqrt() * z[step]
        want = z0t
    preset = dmd2(4)
    pair = EpsilonSpaceGuidance(VPDenoiser(student_unet, a), kdpp.CFGDenoiser(VPDenoiser(teacher_unet, a), 7.5), lam_eps)
    got = kdpp.sample_lcm_distpp(pair.student, pair.teacher, NOISE * preset.initial_noise_scale(), preset.sigmas(), 1.0,
                                 guide_step, extra_args=kw, teacher_extra_args=tkw, noise_sampler=replay_list(z),
                                 renoise_noise_sampler=replay_list(xi), disable=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_epsilon_mix_is_an_x0_mix_of_lam_sigma_ratio_plus_a_noise_term():
    """D_eps = D + lam_eps c_out (s_i / s_{i+1}) (T - D) + lam_eps c_out s_i (eps_S - xi) on the
    consistency sampler (LCM, boundary condition on); with deterministic renoising (xi = eps_S, DMD2: no boundary)
    the noise term vanishes and whole runs agree with the x0-space lam_i = lam_eps s_i / s_{i+1}."""
    a = kdpp.schedules.scaled_linear_alphas_cumprod()
    teacher = kdpp.CFGDenoiser(VPDenoiser(tiny_unet(seed=1), a), 7.5)
    g = torch.Generator().manual_seed(4)
    cond = SDXLConditioning(torch.randn(2, 7, 64, generator=g), torch.randn(2, 7, 64, generator=g),
                            torch.randn(2, 32, generator=g), torch.randn(2, 32, generator=g))
    kw, tkw = sdxl_kwargs(cond)
    lam_eps, xi = 0.01, torch.randn(NOISE.shape, generator=g)
    preset, student = lcm(4), VPDenoiser(UNET, a, lcm_boundary={})
    s = [float(v) for v in preset.sigmas(a)]
    x = NOISE * preset.initial_noise_scale(a)

    def first_step(s_den, t_den, lam):
        seen = {}
        kdpp.sample_lcm_distpp(s_den, t_den, x, preset.sigmas(a)[:2], lam, 1, extra_args=kw, teacher_extra_args=tkw,
                               renoise_noise_sampler=lambda *_: xi, callback=seen.update, disable=True)
        return seen["denoised"]

    pair = EpsilonSpaceGuidance(student, teacher, lam_eps)
    with torch.no_grad():
        d, c_out, skip = student.denoise(x, torch.full((2,), s[0]), **kw)
    assert 0.999 < float(c_out[0]) <= 1  # 1 - 2e-8 at t = 999 (1.0 in float32): the boundary barely moves c_out
    lam_x = lam_eps * float(c_out[0]) * s[0] / s[1]
    eps_s = (x - (d - skip) / c_out) / s[0]
    noise_term = lam_eps * c_out * s[0] * (eps_s - xi)
    got = first_step(pair.student, pair.teacher, 1.0)
    want = first_step(student, teacher, [lam_x]) + noise_term
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (noise_term.abs().mean() / (got - d).abs().mean()) > 0.5  # the noise term is most of the move here

    dmd, plain = dmd2(4), VPDenoiser(UNET, a)
    pair = EpsilonSpaceGuidance(plain, teacher, lam_eps)
    s = [float(v) for v in dmd.sigmas(a)]
    runs = [kdpp.sample_lcm_distpp(st, te, NOISE * dmd.initial_noise_scale(a), dmd.sigmas(a), lam, 3, extra_args=kw,
                                   teacher_extra_args=tkw, renoise="deterministic", noise_sampler=replay(8), disable=True)
            for st, te, lam in ((pair.student, pair.teacher, 1.0), (plain, teacher, [lam_eps * s[i] / s[i + 1] for i in range(3)]))]
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-4, atol=1e-4)


def test_epsilon_space_guidance_needs_its_student_first():
    pair = EpsilonSpaceGuidance(VPDenoiser(UNET, kdpp.schedules.scaled_linear_alphas_cumprod()), lambda x, s: x, 0.01)
    with pytest.raises(RuntimeError, match="called before its student"):
        pair.teacher(NOISE, torch.ones(2))
    with pytest.raises(TypeError, match="student must be a VPDenoiser"):
        EpsilonSpaceGuidance(lambda x, s: x, lambda x, s: x, 0.01)


def test_log_sigma_table_is_cached_on_the_sigma_device():
    """The timestep lookup runs on sigma's device against a table copied there once (a meta
    tensor stands in for an accelerator: any host copy of it would raise)."""
    den = VPDenoiser(lambda x, t: x, kdpp.schedules.scaled_linear_alphas_cumprod())
    meta = den.log_sigmas_on("meta")
    assert meta.device.type == "meta" and den.log_sigmas_on(torch.device("meta")) is meta
    assert den.log_sigmas_on("cpu") is den.log_sigmas
    for mode in ("quantized", "continuous"):
        den.timestep = mode
        assert den.sigma_to_t(torch.ones(3, device="meta")).device.type == "meta"
    on_meta = tiny_unet().to("meta")  # a model's device: its table (and timestep_cond) are put there up front
    den = VPDenoiser(on_meta, kdpp.schedules.scaled_linear_alphas_cumprod(), timestep_cond=torch.ones(1, 8))
    assert torch.device("meta") in den._log_sigmas_on and den.timestep_cond.device.type == "meta"


@pytest.mark.gpu
def test_no_device_to_host_sync_inside_the_sampling_loop_on_cuda(monkeypatch):
    """Every student and teacher call of a guided generate run on CUDA (tiny UNets) runs with
    torch.cuda.set_sync_debug_mode("error"): a host transfer in the VP wrapper or the UNet would raise."""
    import kdpp.diffusers.sdxl as sdxl_module

    class Guarded(VPDenoiser):
        def denoise(self, x, sigma, **kwargs):  # every call, plain or through EpsilonSpaceGuidance
            torch.cuda.set_sync_debug_mode("error")
            try:
                return super().denoise(x, sigma, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(sdxl_module, "VPDenoiser", Guarded)
    cond = SDXLConditioning(torch.randn(1, 7, 64), torch.randn(1, 7, 64), torch.randn(1, 32), torch.randn(1, 32))
    teacher = RecordingUNet(tiny_unet(seed=1).cuda())
    for preset in (lightning(4), lcm(4)):
        lat = generate(copy.deepcopy(UNET).cuda(), teacher, cond, preset, seeds=[0], height=64, width=64,
                       dtype=torch.float32, device="cuda", disable=True)
        assert lat.device.type == "cuda"
    assert len(teacher.calls) == 2


@pytest.mark.parametrize("make, steps, message", [
    (lcm, 0, "LCM samples 1 to original_inference_steps = 50 steps, got steps=0"),
    (lcm, 60, "got steps=60"), (lightning, 3, "got steps=3"), (turbo, 5, "got steps=5"), (dmd2, 2, "got steps=2"),
    (lightning, True, "steps must be an int, got True"), (lcm, 4.0, "steps must be an int, got 4.0"),
])
def test_preset_constructors_refuse_impossible_step_counts(make, steps, message):
    """Every step count is checked when the preset is built, naming the count."""
    with pytest.raises((ValueError, TypeError), match=message):
        make(steps)


def load_paper_setup():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "sdxl_paper_setup.py"
    spec = importlib.util.spec_from_file_location("sdxl_paper_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("lora", [False, True], ids=["unet", "lora"])
def test_paper_setup_script_times_the_runs_its_docstring_names(lora, tmp_path, capsys):
    """The script runs end to end on a saved tiny SDXL pipeline (real encode_prompt) and prints a row for exactly
    the runs its docstring names. LoRA families load the LoRA into the base UNet (pipe.load_lora_weights) and share
    it (SharedLoRAModel)."""
    import re

    from peft.utils import get_peft_model_state_dict
    from tiny_diffusers import add_lora

    pipe = tiny_sdxl_text_pipeline()
    pipe.unet, pipe.vae = tiny_unet(seed=1), diffusers.AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=32)
    pipe.register_modules(unet=pipe.unet, vae=pipe.vae)
    pipe.save_pretrained(tmp_path / "base")
    if lora:
        diffusers.StableDiffusionXLPipeline.save_lora_weights(
            tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(add_lora(tiny_unet(seed=1))))
        student = ["--family", "lcm-lora", "--lora", str(tmp_path / "lora")]
    else:
        UNET.save_pretrained(tmp_path / "student")
        student = ["--student", str(tmp_path / "student")]
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    module = load_paper_setup()
    argv = ["--base", str(tmp_path / "base"), *student, "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"),
            "--steps", "2", "--dtype", "float32", "--height", "64", "--width", "64"]
    assert module.main(argv) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == list(module.RUNS) == re.findall(r'"(student[^"]*)"', module.__doc__)
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


def test_epsilon_space_generate_needs_a_float_lam():
    cond = SDXLConditioning(torch.randn(1, 7, 64), torch.randn(1, 7, 64), torch.randn(1, 32), torch.randn(1, 32))
    with pytest.raises(TypeError, match="lam must be a float with guidance_space='epsilon'"):
        generate(UNET, UNET, cond, dmd2(4), seeds=[0], height=64, width=64, lam=[0.01], dtype=torch.float32, disable=True)
    with pytest.raises(ValueError, match="guidance_space must be one of"):
        generate(UNET, UNET, cond, dmd2(4), seeds=[0], height=64, width=64, guidance_space="eps", dtype=torch.float32)


# ------------------------------------------------------------------ the SDXL family: what the pipeline does, refusals


def cond1(batch=1, width=64, pooled=32):
    g = torch.Generator().manual_seed(3)
    return SDXLConditioning(torch.randn(batch, 7, width, generator=g), torch.randn(batch, 7, width, generator=g),
                            torch.randn(batch, pooled, generator=g), torch.randn(batch, pooled, generator=g))


def recording_forward(unet, key):
    """Record ``key`` of every call to ``unet`` (its forward patched on the instance, as the pipeline calls it)."""
    seen, forward = [], unet.forward

    def record(*args, **kwargs):
        seen.append(kwargs.get(key))
        return forward(*args, **kwargs)

    unet.forward = record
    return seen


def run_sdxl_pipeline(unet, vae=None, **kwargs):
    """diffusers' StableDiffusionXLPipeline (tiny text encoders) around ``unet`` for one step."""
    pipe = tiny_sdxl_text_pipeline()
    pipe.unet, pipe.vae, pipe.watermark = unet, vae, None
    with torch.no_grad():
        return pipe(["a fox"], num_inference_steps=1, height=64, width=64, **kwargs).images


def test_lcm_unet_gets_the_pipelines_guidance_embedding_by_default():
    """An LCM UNet (time_cond_proj_dim) gets the timestep_cond StableDiffusionXLPipeline gives it by default
    (the embedding of guidance_scale - 1, guidance_scale 5.0), by default; student_guidance changes it."""
    unet = tiny_unet(time_cond_proj_dim=8)
    from_pipeline = recording_forward(unet, "timestep_cond")
    run_sdxl_pipeline(unet, output_type="latent")
    want = from_pipeline[0][:1]
    assert want is not None and want.shape == (1, 8)

    from_kdpp = recording_forward(unet, "timestep_cond")
    generate(unet, tiny_unet(seed=1), cond1(2), lcm(2), seeds=[0, 1], height=64, width=64, disable=True)
    assert len(from_kdpp) == 2 and all(torch.equal(c, want.expand(2, -1)) for c in from_kdpp)

    del from_kdpp[:]
    generate(unet, tiny_unet(seed=1), cond1(), lcm(2), seeds=[0], height=64, width=64, student_guidance=8.5, disable=True)
    embedding = diffusers.StableDiffusionXLPipeline.get_guidance_scale_embedding(None, torch.tensor([8.5 - 1]), 8)
    assert all(torch.equal(c, embedding) for c in from_kdpp)
    with pytest.raises(ValueError, match=r"student_guidance=8.5 .* student_unet has none \(its config.time_cond_proj_dim"):
        generate(UNET, tiny_unet(seed=1), cond1(), lcm(2), seeds=[0], height=64, width=64, student_guidance=8.5)


@pytest.mark.parametrize("preset, scheduler", [
    (lightning(4), lambda: diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing")),
    (lightning(1), lambda: diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="trailing", prediction_type="sample")),
], ids=["lightning-4step", "lightning-1step-x0"])
def test_lam0_is_the_sdxl_pipeline(preset, scheduler):
    """At lam = 0 generate is StableDiffusionXLPipeline with the preset's scheduler (no CFG: guidance_scale 0), for the
    same embeddings and per-image CPU generators (output_type="latent"); the teacher is not called."""
    pipe = tiny_sdxl_text_pipeline()
    pipe.unet, pipe.vae, pipe.watermark, pipe.scheduler = UNET, None, None, scheduler()
    cond = cond1(2)
    with torch.no_grad():
        want = pipe(prompt_embeds=cond.prompt_embeds, pooled_prompt_embeds=cond.pooled_prompt_embeds, height=64,
                    width=64, num_inference_steps=len(preset.timesteps), guidance_scale=0.0, output_type="latent",
                    generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    teacher = RecordingUNet(tiny_unet(seed=1))
    got = generate(UNET, teacher, cond, preset, seeds=[3, 4], height=64, width=64, lam=0.0, disable=True)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    assert not teacher.calls


@pytest.mark.parametrize("height, width, error, message", [
    (100, 128, ValueError, "height must be a positive multiple of 8"),
    (128, 130, ValueError, "width must be a positive multiple of 8"),
    (0, 64, ValueError, "height must be a positive multiple of 8"),
    (64, -64, ValueError, "width must be a positive multiple of 8"),
    (64.0, 64, TypeError, "height must be an int"),
    (64, "64", TypeError, "width must be an int"),
])
def test_generate_refuses_image_sizes_the_pipeline_refuses(height, width, error, message):
    """Sizes that are not positive multiples of 8 are refused, as StableDiffusionXLPipeline refuses them (no model
    is called)."""
    if error is ValueError and height > 0 and width > 0:
        pipe = tiny_sdxl_text_pipeline()
        with pytest.raises(ValueError, match="have to be divisible by 8"):
            pipe.check_inputs(["a"], None, height, width, 1)
    student = RecordingUNet(UNET)
    with pytest.raises(error, match=message):
        generate(student, UNET, cond1(), lightning(2), seeds=[0], height=height, width=width, disable=True)
    assert not student.calls


def tiny_vae(**config):
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32,
                                   **config).eval()


@pytest.mark.parametrize("config, dtype", [
    ({"force_upcast": True}, torch.float16),
    ({"latents_mean": [0.1, -0.2, 0.3, 0.0], "latents_std": [0.5, 1.5, 1.0, 2.0]}, torch.float32),
], ids=["force_upcast-fp16", "latents_mean_std"])
def test_decode_is_the_sdxl_pipelines(config, dtype):
    """kdpp's decode gives the SDXL pipeline's images for the same final latents: a float16 VAE with force_upcast
    decodes in float32 (and is float16 again afterwards), latents_mean/latents_std unscale per channel."""
    from kdpp.diffusers.sampling import decode

    latents = 3 * torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    vae = tiny_vae(**config).to(dtype)
    seen, decode_fn = [], vae.decode
    vae.decode = lambda z, *a, **k: (seen.append((z.dtype, vae.dtype)), decode_fn(z, *a, **k))[1]
    unet = tiny_unet()
    unet.forward = lambda sample, *args, **kwargs: (latents.to(sample.dtype),)  # x0 = latents, any input
    pipe = tiny_sdxl_text_pipeline()
    pipe.scheduler = diffusers.EulerDiscreteScheduler(**BETAS, prediction_type="sample")  # one step lands on x0
    pipe.unet, pipe.vae, pipe.watermark = unet, vae, None
    with torch.no_grad():
        want = pipe(["a fox"], num_inference_steps=1, height=64, width=64, guidance_scale=1.0, output_type="np").images
    got = decode(vae, latents)
    assert seen[0] == seen[1] and vae.dtype == dtype  # the pipeline's decode and kdpp's, the VAE as it was
    diff = (torch.tensor(want * 255).round() - torch.tensor(numpy.stack([numpy.asarray(im) for im in got]))).abs()
    assert diff.max() <= 1


def test_sdxl_guided_last_step_calls_the_teacher_unless_renoise_sigma_is_next():
    """k == steps (or guided_steps=[-1]) guides the last step, a step to 0: the default level renoises it at its own
    level; renoise_sigma='next' (level 0) calls no teacher there and warns."""
    teacher = RecordingUNet(tiny_unet(seed=1))
    options = dict(seeds=[0], height=64, width=64, disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(UNET, teacher, cond1(), lightning(2), k=2, **options)
        assert len(teacher.calls) == 2
        generate(UNET, teacher, cond1(), lightning(2), guided_steps=[-1], **options)
    assert len(teacher.calls) == 3 and teacher.timesteps()[-1] == [lightning(2).timesteps[1]]
    with pytest.warns(UserWarning, match=r"guided step\(s\) \[1\] call no teacher \(the teacher is never called\)"):
        generate(UNET, teacher, cond1(), lightning(2), guided_steps=[-1], renoise_sigma="next", **options)
    assert len(teacher.calls) == 3


def test_unets_in_other_dtypes_than_the_sampler_state():
    """Each UNet gets its inputs in its own dtype (as the flow adapters): fp32 UNets with the default dtype, and a
    bf16 teacher with an fp32 student, call the models at the fp32 run's timesteps."""
    student, teacher = RecordingUNet(UNET), RecordingUNet(tiny_unet(seed=1))
    ref = generate(student, teacher, cond1(), lightning(4), seeds=[0], height=64, width=64, disable=True)
    assert ref.dtype == torch.float32  # the default dtype: the student's
    half_teacher = RecordingUNet(HALF_UNETS[torch.bfloat16][1])
    seen = []
    half_teacher.unet.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
        (args[0].dtype, kwargs["encoder_hidden_states"].dtype)), with_kwargs=True)
    mixed = generate(student, half_teacher, cond1(), lightning(4), seeds=[0], height=64, width=64, disable=True)
    assert seen == [(torch.bfloat16, torch.bfloat16)] and half_teacher.timesteps() == teacher.timesteps()
    assert mixed.dtype == torch.float32 and (mixed - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        generate(UNET, UNET, cond1(), lightning(2), seeds=[0], height=64, width=64, dtype="float16")


@pytest.mark.parametrize("seeds, error, message", [
    (3, TypeError, r"seeds must be a sequence of ints, one per image, got the int 3 \(pass \[3\]"),
    ([0.5], TypeError, r"seeds\[0\] must be an int, got 0.5"),
    ("ab", TypeError, "seeds must be a sequence of ints"),
    ([2**70], ValueError, r"seeds\[0\] = .* out of torch.Generator's range"),
    ([], ValueError, "seeds must name at least one image"),
])
def test_generate_refuses_bad_seeds(seeds, error, message):
    with pytest.raises(error, match=message):
        generate(UNET, UNET, cond1(), lightning(2), seeds=seeds, height=64, width=64, disable=True)


def test_numpy_seeds_are_ints():
    options = dict(height=64, width=64, disable=True)
    torch.testing.assert_close(generate(UNET, UNET, cond1(), lightning(2), seeds=numpy.array([7]), **options),
                               generate(UNET, UNET, cond1(), lightning(2), seeds=[7], **options), rtol=0, atol=0)


def test_wrong_object_types_are_refused_by_name():
    from kdpp.diffusers import flow_presets
    from kdpp.diffusers.presets import StudentPreset, TeacherPreset

    options = dict(seeds=[0], height=64, width=64)
    with pytest.raises(TypeError, match="preset must be a StudentPreset, got FlowStudentPreset"):
        generate(UNET, UNET, cond1(), flow_presets.flux_schnell(), **options)
    with pytest.raises(TypeError, match="preset must be a StudentPreset, got str"):
        generate(UNET, UNET, cond1(), "sdxl-lightning", **options)
    with pytest.raises(TypeError, match="preset must be a StudentPreset, got TeacherPreset"):
        generate(UNET, UNET, cond1(), TeacherPreset(), teacher=lightning(2), **options)
    with pytest.raises(TypeError, match="conditioning must be a SDXLConditioning, got dict"):
        generate(UNET, UNET, KW, lightning(2), **options)
    with pytest.raises(ValueError, match=r"StudentPreset.sampler must be one of kdpp.SAMPLERS .* got 'eular'"):
        StudentPreset("x", "eular", (999,))
    with pytest.raises(ValueError, match="sampler must be one of kdpp.SAMPLERS"):
        sdxl_teacher("bogus")


def test_sdxl_mismatches_are_refused_before_any_call():
    """A non-SDXL teacher, a VAE of another latent space, embeddings of other widths: clear errors, no model call."""
    from diffusers import SD3Transformer2DModel

    sd3 = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96)
    student = RecordingUNet(UNET)
    options = dict(seeds=[0], height=64, width=64, disable=True)
    with pytest.raises(ValueError, match="teacher_unet is not an SDXL UNet .* got SD3Transformer2DModel"):
        generate(student, sd3, cond1(), lightning(2), **options)
    with pytest.raises(ValueError, match="vae has 8 latent channels, the UNets take 4"):
        generate(student, UNET, cond1(), lightning(2), vae=diffusers.AutoencoderKL(
            block_out_channels=(32,), latent_channels=8, norm_num_groups=32), **options)
    with pytest.raises(ValueError, match=r"conditioning.prompt_embeds has width 32, student_unet takes 64 \(its config.cross_attention_dim\)"):
        generate(student, UNET, cond1(width=32), lightning(2), **options)
    with pytest.raises(ValueError, match=r"conditioning.pooled_prompt_embeds has width 16, student_unet takes 32"):
        generate(student, UNET, cond1(pooled=16), lightning(2), **options)
    assert not student.calls


def test_sdxl_conditioning_from_encode_prompt_without_cfg_says_how_to_fix_it():
    pipe = tiny_sdxl_text_pipeline()
    with torch.no_grad():
        out = pipe.encode_prompt(["a cat"], device="cpu", do_classifier_free_guidance=False)
    with pytest.raises(TypeError, match=r"negative_prompt_embeds must be a tensor .*do_classifier_free_guidance=True"):
        SDXLConditioning(*out)
    cond = SDXLConditioning(*pipe.encode_prompt(["a cat"], device="cpu", do_classifier_free_guidance=True))
    assert cond.to("cpu").prompt_embeds.dtype == torch.float32  # device only: the dtype stays


def test_alphas_cumprod_must_cover_the_preset_timesteps():
    a = kdpp.schedules.scaled_linear_alphas_cumprod()
    with pytest.raises(ValueError, match=r"alphas_cumprod has 500 entries, preset 'sdxl-lightning-2step' samples timestep 999"):
        generate(UNET, UNET, cond1(), lightning(2), seeds=[0], height=64, width=64, alphas_cumprod=a[:500])
    with pytest.raises(ValueError, match="alphas_cumprod must be a 1-D float tensor"):
        generate(UNET, UNET, cond1(), lightning(2), seeds=[0], height=64, width=64, alphas_cumprod=a[None])


def test_guided_steps_may_be_an_iterator():
    """generate reads guided_steps more than once (is the teacher called? then the sampler): an iterator works."""
    teacher = RecordingUNet(tiny_unet(seed=1))
    options = dict(seeds=[0], height=64, width=64, disable=True, dtype=torch.float32)
    generate(UNET, teacher, cond1(), dmd2(4), guided_steps=iter([0, 1]), **options)  # epsilon space: read twice
    assert len(teacher.calls) == 2


def test_presets_may_name_samplers_without_solver_noise():
    """A preset whose sampler draws no solver noise (DPM++ 2M) runs through the body, and calls the teacher once."""
    import dataclasses

    teacher = RecordingUNet(tiny_unet(seed=1))
    preset = dataclasses.replace(lightning(4), sampler="dpmpp_2m")
    out = generate(UNET, teacher, cond1(), preset, seeds=[0], height=32, width=32, disable=True)
    assert out.shape == (1, 4, 4, 4) and torch.isfinite(out).all() and len(teacher.calls) == 1
