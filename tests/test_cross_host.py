"""One seed, one guided result in every host: kdpp.sample_*, kdpp.hosts in k-diffusion's convention and inside
ComfyUI, the ComfyUI nodes, and DistillationDenoiser where it is the paper's form; split schedules equal the unsplit
run in each. The models are a real ComfyUI's (0.3.75): the same UNets called through ComfyUI's sampling machinery and,
outside it, through their own ``apply_model`` (a VE x0 denoiser for EPS models)."""
import inspect

import pytest
import torch

import kdpp
from kdpp.hosts import bind, register
from kdpp.wrappers import DistillationDenoiser
import comfyui_env
from comfyui_env import comfyui_root, import_comfyui

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
CONTEXT, SEED, LAM, K = 16, 5, 0.5, 2
OPTIONS = {"renoise": "random", "renoise_sigma": "random"}  # exercises the renoise and the level streams


@pytest.fixture(scope="module")
def cf():
    root, reason = comfyui_root()
    if root is None:
        pytest.skip(reason)
    env = import_comfyui(root)
    from kdpp.comfyui import nodes, sampling  # imports comfy: only now
    env.kdpp_nodes, env.sampling = nodes, sampling
    return env


@pytest.fixture(scope="module")
def models(cf):
    student = comfyui_env.tiny_model(cf, seed=0, channels=32, context_dim=CONTEXT)
    teacher = comfyui_env.tiny_model(cf, seed=1, channels=32, context_dim=CONTEXT)
    return student, teacher


def cond(seed):
    return comfyui_env.conditioning(seed, CONTEXT)


def as_denoiser(patcher, seed):
    """The UNet outside ComfyUI's sampler: ``BaseModel.apply_model`` returns x0 at (x, sigma) for an EPS model."""
    context = cond(seed)[0][0]

    def denoiser(x, sigma, **_):
        return patcher.model.apply_model(x, sigma, c_crossattn=context.expand(x.shape[0], -1, -1))

    return denoiser


def start(cf, student, sigmas):
    """The initial noise of seed SEED and the sample ComfyUI starts from (its own noise scaling)."""
    noise = kdpp.initial_noise(SEED, (1, 4, 8, 8))
    torch.testing.assert_close(noise, cf.comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), SEED), rtol=0, atol=0)
    sampling = student.get_model_object("model_sampling")
    return noise, sampling.noise_scaling(sigmas[0], noise, torch.zeros_like(noise), max_denoise=True)


def custom_sample(cf, model, sampler, sigmas, lat=None, add_noise=True):
    """ComfyUI's SamplerCustom node at CFG 1 (one conditional model call per step), seed SEED."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    lat = lat or {"samples": torch.zeros(1, 4, 8, 8)}
    return SamplerCustom.execute(model, add_noise, SEED, 1.0, cond(1), cond(9), sampler, sigmas, lat).result[0]["samples"]


def solver_noise(cf, name, x):
    """ComfyUI's solver noise for SEED, for the samplers that draw any (what ComfyUI hands its own samplers)."""
    from comfy.k_diffusion.sampling import default_noise_sampler

    takes = "noise_sampler" in inspect.signature(kdpp.SAMPLERS[name]).parameters
    return {"noise_sampler": default_noise_sampler(x, seed=SEED)} if takes else {}


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_one_seed_gives_one_guided_result_in_every_host(cf, models, name):
    student, teacher = models
    S, T = as_denoiser(student, 1), as_denoiser(teacher, 3)
    sigmas = cf.comfy.samplers.calculate_sigmas(student.get_model_object("model_sampling"), "karras", 6).cpu()
    _, x = start(cf, student, sigmas)
    out = student.model.process_latent_out  # what SamplerCustom hands back

    direct = out(kdpp.SAMPLERS[name](S, T, x, sigmas, LAM, K, seed=SEED, disable=True, **OPTIONS,
                                     **solver_noise(cf, name, x)))
    hosted = out(bind(kdpp.SAMPLERS[name], T, LAM, K, seed=SEED, **OPTIONS)(S, x, sigmas, disable=True,
                                                                             **solver_noise(cf, name, x)))
    import comfy.k_diffusion.sampling as comfy_ks

    added = register(comfy_ks, [name], teacher=T, lam=LAM, k=K, **OPTIONS)
    try:
        registered = custom_sample(cf, student, cf.comfy.samplers.ksampler(f"{name}_distpp"), sigmas)
    finally:
        for attr in added:
            delattr(comfy_ks, attr)
    node_sampler = cf.sampling.DistillationSampler(name, teacher, cond(3), cond(9), 1.0, LAM, K, **OPTIONS)
    node = custom_sample(cf, student, node_sampler, sigmas)
    node_ks = cf.kdpp_nodes.DistillationPPKSampler().sample(
        student, seed=SEED, steps=6, cfg=1.0, sampler_name=name, scheduler="karras", positive=cond(1), negative=cond(9),
        latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0, teacher=teacher, teacher_positive=cond(3),
        teacher_negative=cond(9), teacher_cfg=1.0, lam=LAM, k=K, renoise=OPTIONS["renoise"],
        renoise_level=OPTIONS["renoise_sigma"])[0]["samples"]
    tol = dict(rtol=1e-4, atol=1e-4 * direct.abs().max().item())
    assert (direct - out(kdpp.SAMPLERS[name](S, T, x, sigmas, 0.0, K, seed=SEED, disable=True,
                                               **solver_noise(cf, name, x)))).abs().max() > 1e-3  # the teacher acts
    torch.testing.assert_close(hosted, direct, **tol, msg="kdpp.hosts, k-diffusion's convention")
    torch.testing.assert_close(registered, direct, **tol, msg="kdpp.hosts registered inside ComfyUI")
    torch.testing.assert_close(node, direct, **tol, msg="Distillation++ Sampler node")
    torch.testing.assert_close(node_ks, direct, **tol, msg="Distillation++ KSampler node")


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "lcm"])
def test_split_schedules_equal_the_unsplit_run_in_every_host(cf, models, name):
    """Stages given the full schedule draw and guide as the unsplit run: core, SamplerCustom + SplitSigmas, KSampler
    node stages (ComfyUI's own solver noise restarts per stage, so the ancestral solvers' stages match kdpp's only
    where the solver noise is ComfyUI's in both: the nodes)."""
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    student, teacher = models
    S, T = as_denoiser(student, 1), as_denoiser(teacher, 3)
    sigmas = cf.comfy.samplers.calculate_sigmas(student.get_model_object("model_sampling"), "karras", 6).cpu()
    _, x = start(cf, student, sigmas)
    sampler = kdpp.SAMPLERS[name]
    whole = sampler(S, T, x, sigmas, LAM, 3, seed=SEED, disable=True, **OPTIONS)
    first = sampler(S, T, x, sigmas[:3], LAM, 3, seed=SEED, full_sigmas=sigmas, disable=True, **OPTIONS)
    staged = sampler(S, T, first, sigmas[2:], LAM, 3, seed=SEED, full_sigmas=sigmas, disable=True, **OPTIONS)
    torch.testing.assert_close(staged, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item(), msg="core")
    if name != "euler":  # ComfyUI's solver noise restarts at each stage; Euler draws none
        return
    node = lambda **kw: cf.sampling.DistillationSampler(name, teacher, cond(3), cond(9), 1.0, LAM, 3, **OPTIONS, **kw)
    unsplit = custom_sample(cf, student, node(), sigmas)
    torch.testing.assert_close(unsplit, student.model.process_latent_out(whole), rtol=1e-4,
                               atol=1e-4 * unsplit.abs().max().item(), msg="node = core")
    high, low = SplitSigmas.execute(sigmas, 2).result
    two = custom_sample(cf, student, node(full_sigmas=sigmas), low,
                        lat={"samples": custom_sample(cf, student, node(full_sigmas=sigmas), high)}, add_noise=False)
    torch.testing.assert_close(two, unsplit, rtol=1e-5, atol=1e-5 * unsplit.abs().max().item(), msg="SplitSigmas")


def test_distillation_denoiser_equals_the_paper_form_where_they_coincide(cf, models):
    """On a guided step to sigma 0 both forms are R(D): k-diffusion's own sample_euler with the wrapper equals kdpp's
    Euler, with the same seed, on ComfyUI's UNets."""
    student, teacher = models
    S, T = as_denoiser(student, 1), as_denoiser(teacher, 3)
    sigmas = cf.comfy.samplers.calculate_sigmas(student.get_model_object("model_sampling"), "karras", 6).cpu()
    _, x = start(cf, student, sigmas)
    paper = kdpp.sample_euler_distpp(S, T, x, sigmas, LAM, guided_steps=[-1], seed=SEED, disable=True, **OPTIONS)
    wrapped = DistillationDenoiser(S, T, sigmas, LAM, guided_steps=[-1], seed=SEED, **OPTIONS)
    torch.testing.assert_close(ks.sample_euler(wrapped, x, sigmas, disable=True), paper, rtol=1e-5,
                               atol=1e-5 * paper.abs().max().item())
