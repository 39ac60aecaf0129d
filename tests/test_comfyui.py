"""The Distillation++ node pack inside a real ComfyUI (0.3.75, fetched on first use: tests/comfyui_env.py).

Tiny checkpoint-free SD1.5-shaped UNets (EPS, and the same UNet as a CONST flow model) with random
weights, one torch thread; ComfyUI is imported once per session.
"""
import asyncio
import json
import math
import time
from pathlib import Path

import pytest
import torch

from comfyui_env import comfyui_root, import_comfyui

DOCS = Path(__file__).resolve().parent.parent / "docs"
UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1], "transformer_depth": [1],
        "channel_mult": [1], "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 16,
        "num_heads": 2, "transformer_depth_output": [1, 1], "use_temporal_attention": False, "use_temporal_resblock": False}
# ComfyUI's built-in samplers that kdpp has and defines the same way, by the name both use
# (dpmpp_2s_ancestral_cfg_pp is defined differently: see its own test)
BUILTIN = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp",
           "dpmpp_2m_cfg_pp"]


@pytest.fixture(scope="session")
def cf():
    root, reason = comfyui_root()
    if root is None:
        pytest.skip(reason)
    started = time.perf_counter()
    env = import_comfyui(root)
    env.import_seconds = time.perf_counter() - started
    from kdpp.comfyui import sampling  # imports comfy: only now
    env.sampling = sampling
    return env


def tiny_model(cf, flow=False, seed=0):
    """A checkpoint-free SD1.5-shaped UNet as a ModelPatcher (ComfyUI skips weight init: initialise here)."""
    comfy = cf.comfy
    config = comfy.supported_models.SD15(dict(UNET))
    model_type = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(config, model_type=model_type)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            else:
                p.copy_(torch.ones_like(p) if "norm" in name and name.endswith("weight") else 0.1 * torch.randn(p.shape, generator=g))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def cond(seed, batch=1):
    return [[torch.randn(batch, 3, UNET["context_dim"], generator=torch.Generator().manual_seed(seed)), {}]]


def latent(batch=1):
    return {"samples": torch.zeros(batch, 4, 8, 8)}


def custom_sample(cf, model, sampler, sigmas, seed=5, cfg=3.0, lat=None, add_noise=True):
    """ComfyUI's SamplerCustom node, as a graph runs it."""
    from comfy_extras.nodes_custom_sampler import SamplerCustom

    out = SamplerCustom.execute(model, add_noise, seed, cfg, cond(1), cond(2), sampler, sigmas, lat or latent())
    return out.result[0]["samples"]


def schedule(cf, model, steps=6, scheduler="karras"):
    return cf.comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps).cpu()


class Counter:
    """Counts the teacher's evaluations from inside ComfyUI (its UNet function wrapper): one per conditional batch."""

    def __init__(self, patcher):
        self.patcher = patcher.clone()
        self.patcher.set_model_unet_function_wrapper(self)
        self.timesteps, self.inputs = [], []

    def __deepcopy__(self, memo):  # ModelPatcher.clone deep-copies model_options: keep counting here
        return self

    def __call__(self, apply_model, args):
        for j, kind in enumerate(args["cond_or_uncond"]):
            if kind == 0:
                n = args["input"].shape[0] // len(args["cond_or_uncond"])
                self.timesteps.append(float(args["timestep"][j * n]))  # sigma (t for CONST models)
                self.inputs.append(args["input"][j * n:(j + 1) * n].clone())
        return apply_model(args["input"], args["timestep"], **args["c"])

    @property
    def evaluations(self):
        return len(self.timesteps)


def kdpp_sampler(cf, solver, teacher=None, lam=0.0, k=1, teacher_cfg=3.0, **kw):
    return cf.sampling.DistillationSampler(solver, teacher, cond(1), cond(2), teacher_cfg, lam, k, **kw)


@pytest.fixture(scope="session")
def student(cf):
    return tiny_model(cf, seed=0)


@pytest.fixture(scope="session")
def teacher(cf):
    return tiny_model(cf, seed=1)


@pytest.mark.parametrize("name", BUILTIN)
def test_lam_zero_equals_comfyui_builtin_sampler(cf, student, name):
    """lam = 0 through SamplerCustom is ComfyUI's own sampler of that name (same seed, same noise)."""
    sigmas = schedule(cf, student)
    want = custom_sample(cf, student, cf.comfy.samplers.sampler_object(name), sigmas)
    got = custom_sample(cf, student, kdpp_sampler(cf, name), sigmas)
    assert torch.isfinite(want).all() and want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_dpmpp_2s_ancestral_cfg_pp_is_defined_differently_in_comfyui(cf, student):
    """ComfyUI 0.3.75's 2S CFG++ ends its step with (s_down / s) (x + D1_w - D2_u) - expm1(-h) D2_w, the first
    stage's guided x0 next to the second stage's unconditional one; kdpp uses the second stage's pair,
    D2_w + (s_down / s) (x - D2_u) (MATH.md). They agree where no midpoint is taken (s_down = 0)."""
    sigmas = schedule(cf, student)
    name = "dpmpp_2s_ancestral_cfg_pp"
    last = sigmas[-2:]  # a single step to sigma 0: s_down = 0
    want = custom_sample(cf, student, cf.comfy.samplers.sampler_object(name), last)
    got = custom_sample(cf, student, kdpp_sampler(cf, name), last)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    full = custom_sample(cf, student, cf.comfy.samplers.sampler_object(name), sigmas)
    assert (custom_sample(cf, student, kdpp_sampler(cf, name), sigmas) - full).abs().max() > 1e-2


SOLVERS5 = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"]


@pytest.mark.parametrize("name", SOLVERS5 + ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_teacher_evaluations_counted_inside_comfyui(cf, student, teacher, name):
    """0 at lam = 0 (the teacher is not even loaded); k per run (2S: two per guided step, one per stage)."""
    sigmas = schedule(cf, student)
    counter = Counter(teacher)
    custom_sample(cf, student, kdpp_sampler(cf, name, counter.patcher, lam=0.0, k=3), sigmas)
    assert counter.evaluations == 0
    custom_sample(cf, student, kdpp_sampler(cf, name, counter.patcher, lam=0.5, k=2), sigmas)
    per_step = 2 if name.startswith("dpmpp_2s") else 1
    assert counter.evaluations == 2 * per_step
    # renoised to the next sigma (2S: the midpoint, then the next sigma); apply_model receives sigma
    assert counter.timesteps[-1] == pytest.approx(float(sigmas[2]), rel=1e-5)


@pytest.mark.parametrize("name", SOLVERS5)
def test_teacher_clone_of_student_in_guidance_form_is_lam_zero_exactly(cf, student, name):
    """Guidance form (paper eq. 10): R = D + lam (T(x_i) - S(x_i)) = D when T is the student's clone, same conds and CFG."""
    sigmas = schedule(cf, student)
    clone = Counter(student)
    plain = custom_sample(cf, student, kdpp_sampler(cf, name), sigmas)
    guided = custom_sample(cf, student, kdpp_sampler(cf, name, clone.patcher, lam=0.7, k=3, renoise="guidance"), sigmas)
    assert clone.evaluations >= 3
    assert torch.equal(guided, plain)


def test_guided_run_differs_and_is_reproducible(cf, student, teacher):
    sigmas = schedule(cf, student)
    plain = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral"), sigmas)
    a = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral", teacher, lam=0.5, k=2), sigmas)
    b = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral", teacher, lam=0.5, k=2), sigmas)
    assert torch.equal(a, b) and (a - plain).abs().max() > 1e-3


def comfy_sample(cf, model, sampler, sigmas, seed=5, cfg=3.0):
    """comfy.samplers.sample with a callback recording (i, x)."""
    lat = latent()["samples"]
    noise = cf.comfy.sample.prepare_noise(lat, seed)
    xs = {}
    out = cf.comfy.samplers.sample(model, noise, cond(1), cond(2), cfg, model.load_device, sampler, sigmas,
                                   model_options=model.model_options, latent_image=lat, seed=seed,
                                   callback=lambda i, denoised, x, total: xs.setdefault(i, x.clone()))
    return out, xs


@pytest.fixture(scope="session")
def flow_student(cf):
    return tiny_model(cf, flow=True, seed=2)


def test_const_flow_model_euler_equals_comfyui_euler(cf, flow_student):
    """A CONST model (x in the RF frame, sigma = t, schedule from t = 1): kdpp runs in the VE frame around it."""
    ms = flow_student.get_model_object("model_sampling")
    assert isinstance(ms, cf.comfy.model_sampling.CONST)
    sigmas = schedule(cf, flow_student, scheduler="simple")
    assert float(sigmas[0]) == 1.0
    want, want_x = comfy_sample(cf, flow_student, cf.comfy.samplers.sampler_object("euler"), sigmas)
    got, got_x = comfy_sample(cf, flow_student, kdpp_sampler(cf, "euler"), sigmas)
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for i in want_x:  # callbacks see the host's frame
        torch.testing.assert_close(got_x[i], want_x[i], rtol=1e-5, atol=1e-5 * want_x[i].abs().max().item())


def test_const_flow_model_teacher_is_queried_in_the_rf_frame(cf, flow_student):
    """renoise='deterministic' at the next level: the teacher sees the point plain Euler steps to, x_1 in RF."""
    sigmas = schedule(cf, flow_student, scheduler="simple")
    _, plain_x = comfy_sample(cf, flow_student, cf.comfy.samplers.sampler_object("euler"), sigmas)
    counter = Counter(flow_student)
    comfy_sample(cf, flow_student, kdpp_sampler(cf, "euler", counter.patcher, lam=1.0, k=1, renoise="deterministic"), sigmas)
    assert counter.evaluations == 1
    assert counter.timesteps[0] == pytest.approx(float(sigmas[1]), rel=1e-5)  # apply_model receives t
    torch.testing.assert_close(counter.inputs[0], plain_x[1], rtol=1e-5, atol=1e-5 * plain_x[1].abs().max().item())


def test_kdpp_hosts_registered_into_comfyui(cf, student, flow_student):
    """kdpp.hosts.register into ComfyUI's k_diffusion namespace: ComfyUI's own seeding, the CONST frame."""
    import comfy.k_diffusion.sampling as ks

    from kdpp.hosts import register

    added = register(ks, ["euler", "euler_ancestral", "lcm"])
    try:
        for model, name, builtin, scheduler in [(student, "euler_ancestral_distpp", "euler_ancestral", "karras"),
                                                (student, "lcm_distpp", "lcm", "karras"),
                                                (flow_student, "euler_distpp", "euler", "simple"),
                                                (flow_student, "lcm_distpp", "lcm", "simple")]:
            sigmas = schedule(cf, model, scheduler=scheduler)
            want = custom_sample(cf, model, cf.comfy.samplers.sampler_object(builtin), sigmas)
            got = custom_sample(cf, model, cf.comfy.samplers.ksampler(name, {"lam": 0.0}), sigmas)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=name)
    finally:
        for name in added:
            delattr(ks, name)


def test_split_schedule_calls_the_teacher_as_often_as_the_unsplit_run(cf, student, teacher):
    from comfy_extras.nodes_custom_sampler import SplitSigmas

    from kdpp.comfyui.nodes import DistillationPPKSampler

    counter = Counter(teacher)
    node = DistillationPPKSampler()
    common = dict(model=student, seed=5, steps=6, cfg=3.0, solver="euler_ancestral", scheduler="karras",
                  positive=cond(1), negative=cond(2), teacher=counter.patcher, teacher_positive=cond(1),
                  teacher_negative=cond(2), teacher_cfg=3.0, lam=0.5, k=3, renoise="random", renoise_level="next",
                  denoise=1.0)
    node.sample(latent_image=latent(), **common)
    assert counter.evaluations == 3
    for split in (1, 2, 4):  # KSamplerAdvanced-style two stages
        counter.timesteps.clear()
        first = node.sample(latent_image=latent(), end_at_step=split, return_with_leftover_noise=True, **common)[0]
        node.sample(latent_image=first, add_noise=False, start_at_step=split, **common)
        assert counter.evaluations == 3, split
    # SamplerCustom with SplitSigmas: k counts on the full schedule given as full_sigmas
    sigmas = schedule(cf, student)
    high, low = SplitSigmas.execute(sigmas, 2).result
    counter.timesteps.clear()
    stage = lambda s: kdpp_sampler(cf, "euler", counter.patcher, lam=0.5, k=3, full_sigmas=sigmas)
    first = custom_sample(cf, student, stage(high), high)
    custom_sample(cf, student, stage(low), low, lat={"samples": first}, add_noise=False)
    assert counter.evaluations == 3


def lora_state_dict(model, rank=2, seed=3):
    """A kohya-format LoRA (lora_up / lora_down / alpha) on every linear layer of the tiny UNet."""
    import comfy.lora

    g = torch.Generator().manual_seed(seed)
    weights = model.model.state_dict()
    lora = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        w = weights.get(target) if isinstance(target, str) else None
        if name.startswith("lora_unet_") and w is not None and w.ndim == 2:
            lora[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.3
            lora[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.3
            lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora


def test_lora_student_on_its_base_teacher_shares_the_base_weights(cf):
    """LoraLoader's own code makes the student a clone of the base with LoRA patches; the base is the teacher.

    One BaseModel holds the weights for both; the result equals the same run with an independent
    copy of the base as teacher (so each call saw its own weights), and the shared model is
    left with the student's weights loaded, as ComfyUI leaves a sampled model.
    """
    import comfy.sd

    base = tiny_model(cf, seed=4)
    student, _ = comfy.sd.load_lora_for_models(base, None, lora_state_dict(base), 1.0, 0.0)
    assert student.is_clone(base) and student.model is base.model and student.patches
    sigmas = schedule(cf, student)
    plain = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral"), sigmas)
    counter = Counter(base)
    sampler = kdpp_sampler(cf, "euler_ancestral", counter.patcher, lam=0.5, k=2)
    params_before = {p.data_ptr() for p in base.model.parameters()}
    shared = custom_sample(cf, student, sampler, sigmas)
    assert counter.evaluations == 2
    switch = sampler.last_switch
    assert switch.shared and switch.needed and switch.switches == 2 * 2 + 1  # load the student, then 2 per call
    separate = custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral", tiny_model(cf, seed=4), lam=0.5, k=2), sigmas)
    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-5 * separate.abs().max().item())
    assert (shared - plain).abs().max() > 1e-3
    assert base.model.current_weight_patches_uuid == student.patches_uuid
    # the plain student run after a guided one is unchanged (no weights left from the teacher)
    torch.testing.assert_close(custom_sample(cf, student, kdpp_sampler(cf, "euler_ancestral"), sigmas), plain,
                               rtol=0, atol=0)
    assert len(params_before) == sum(1 for _ in base.model.parameters())
