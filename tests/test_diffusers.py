"""kdpp's VP adapter and presets against diffusers' own schedulers, on a tiny SDXL-architecture UNet."""
import os

import pytest
import torch

import kdpp
from kdpp.diffusers.presets import dmd2, lcm, lcm_timesteps, lightning, sdxl_teacher, turbo
from kdpp.diffusers.sdxl import SDXLConditioning, check_shared_latent_space, generate, time_ids
from kdpp.diffusers.vp import VPDenoiser, guidance_scale_embedding

diffusers = pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_unet(seed=0, in_channels=4, time_cond_proj_dim=None):
    """diffusers' own SDXL test configuration: random weights, no download."""
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=32, time_cond_proj_dim=time_cond_proj_dim).eval()


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
    cond = SDXLConditioning(torch.randn(3, 7, 64, generator=g), torch.randn(3, 32, generator=g),
                            torch.randn(3, 7, 64, generator=g), torch.randn(3, 32, generator=g))
    teacher = tiny_unet(seed=1)
    vae = diffusers.AutoencoderKL(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32).eval()
    images = generate(UNET, teacher, cond, lightning(4), seeds=[10, 11, 12], height=128, width=128, lam=0.5,
                      dtype=torch.float32, vae=vae, disable=True)
    assert len(images) == 3 and images[0].size == (32, 32)
    lat = generate(UNET, teacher, cond, dmd2(4), seeds=[10, 11, 12], height=128, width=128, dtype=torch.float32, disable=True)
    part = generate(UNET, teacher, SDXLConditioning(*(t[1:2] for t in (cond.prompt_embeds, cond.pooled_prompt_embeds,
                    cond.negative_prompt_embeds, cond.negative_pooled_prompt_embeds))), dmd2(4), seeds=[11],
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
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "sdxl_paper_setup.py"
    spec = importlib.util.spec_from_file_location("sdxl_paper_setup", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (tmp_path / "p.txt").write_text("a cat\n")
    assert module.main(["--base", str(tmp_path / "none"), "--student", str(tmp_path), "--prompts", str(tmp_path / "p.txt")]) == 2
    assert "is not a local folder" in capsys.readouterr().err


def test_old_import_paths_still_work():
    """kdpp.vp, kdpp.presets and kdpp.sdxl moved into kdpp.diffusers; the old names stay importable."""
    import kdpp.diffusers.presets
    import kdpp.diffusers.sdxl
    import kdpp.diffusers.vp
    from kdpp import presets, sdxl, vp

    assert vp.VPDenoiser is kdpp.diffusers.vp.VPDenoiser
    assert presets.lightning is kdpp.diffusers.presets.lightning
    assert sdxl.generate is kdpp.diffusers.sdxl.generate
