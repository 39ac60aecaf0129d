"""Drop-in use: k-diffusion's signature (bind), named lookup (register), ComfyUI's KSAMPLER call."""
import inspect
import types

import pytest
import torch

import kdpp
from kdpp.hosts import HOST_ONLY_KEYS, bind, host_sampler, register
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
SIGMAS = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.0], dtype=torch.float64)
PAIRS = [("euler", ks.sample_euler), ("euler_ancestral", ks.sample_euler_ancestral),
         ("dpmpp_2s_ancestral", ks.sample_dpmpp_2s_ancestral), ("dpmpp_2m", ks.sample_dpmpp_2m)]


@pytest.mark.parametrize("name, theirs", PAIRS, ids=[p[0] for p in PAIRS])
def test_bound_sampler_with_lam_zero_is_kdiffusion(name, theirs):
    teacher = Recorder(other_denoiser)
    fn = bind(kdpp.SAMPLERS[name], teacher, lam=0.0, k=2)
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    torch.manual_seed(0)
    got = fn(nonlinear_denoiser, x, SIGMAS, extra_args={}, callback=None, disable=True)
    torch.manual_seed(0)
    want = theirs(nonlinear_denoiser, x, SIGMAS, extra_args={}, callback=None, disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert teacher.calls == 0 and fn.__name__ == kdpp.SAMPLERS[name].__name__


def test_bound_sampler_guides_and_accepts_call_time_overrides():
    teacher = Recorder(other_denoiser)
    fn = bind(kdpp.sample_euler_distpp, teacher, lam=0.5, k=1, renoise="deterministic")
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    direct = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, 1, renoise="deterministic", disable=True)
    torch.testing.assert_close(fn(nonlinear_denoiser, x, SIGMAS, disable=True), direct, rtol=0, atol=0)
    fn(nonlinear_denoiser, x, SIGMAS, disable=True, k=3)
    assert teacher.sigmas == [4.0, 4.0, 1.5, 0.5]


def test_register_into_kdiffusion_namespace_for_lookup_by_name():
    ns = types.SimpleNamespace()
    names = register(ns, teacher=other_denoiser, lam=0.5, k=1, renoise_seed=3)
    assert names == [f"sample_{name}_distpp" for name in ("euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m",
                                                          "lcm")]  # the CFG++ forms only by name
    assert register(ns, ["dpmpp_2m_cfg_pp"]) == ["sample_dpmpp_2m_cfg_pp_distpp"]
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    fn = getattr(ns, "sample_" + "euler_distpp")
    torch.testing.assert_close(fn(nonlinear_denoiser, x, SIGMAS, disable=True),
                               kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, 1,
                                                        renoise_seed=3, disable=True), rtol=0, atol=0)
    module = types.ModuleType("k_diffusion_like")
    register(module, ["lcm"])  # unbound: the teacher comes at call time
    out = module.sample_lcm_distpp(nonlinear_denoiser, x, SIGMAS, teacher=other_denoiser, lam=0.5, disable=True)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        register(ns, ["heun"])


def test_register_into_the_real_kdiffusion_module():
    added = register(ks, ["euler"])
    try:
        fn = getattr(ks, "sample_euler_distpp")
        x = torch.randn(2, 3, dtype=torch.float64) * 10
        assert fn(nonlinear_denoiser, x, SIGMAS, disable=True).shape == x.shape
    finally:
        for name in added:
            delattr(ks, name)


class KSamplerX0Inpaint:
    """The shape of ComfyUI's model wrapper: extra_args arrive as keywords, host keys included."""

    def __init__(self):
        self.seen = []

    def __call__(self, x, sigma, denoise_mask=None, model_options={}, seed=None, cond=None, uncond=None, cond_scale=1.0):
        self.seen.append(seed)
        return nonlinear_denoiser(x, sigma) * (1 + 0.01 * cond_scale)


def ksampler_call(sampler_function, extra_options, seed):
    """What ComfyUI's KSAMPLER.sample does with a sampler function."""
    model_k = KSamplerX0Inpaint()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed)) * 10
    extra_args = {"cond": [1], "uncond": [0], "cond_scale": 5.0, "model_options": {"transformer_options": {}},
                  "seed": seed, "denoise_mask": None}
    steps = []
    k_callback = lambda d: steps.append((d["i"], d["denoised"], d["x"]))
    out = sampler_function(model_k, noise, SIGMAS.float(), extra_args=extra_args, callback=k_callback, disable=True,
                           **extra_options)
    return out, steps, model_k


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_comfyui_ksampler_calling_contract(name):
    teacher_seen = []

    def teacher(x, sigma, cond=None, uncond=None, cond_scale=None, **rest):
        assert not (set(rest) & HOST_ONLY_KEYS), rest
        teacher_seen.append(cond_scale)
        return other_denoiser(x, sigma)

    sampler = host_sampler(kdpp.SAMPLERS[name])
    options = {"teacher": teacher, "lam": 0.5, "k": 2}
    a, steps, model_k = ksampler_call(sampler, options, seed=7)
    b, _, _ = ksampler_call(sampler, options, seed=7)
    c, _, _ = ksampler_call(sampler, options, seed=8)
    assert a.dtype == torch.float32 and torch.equal(a, b) and not torch.equal(a, c)
    assert [s[0] for s in steps] == list(range(len(SIGMAS) - 1))
    assert set(model_k.seen) == {7} and teacher_seen and set(teacher_seen) == {5.0}


def test_host_seed_gives_comfyui_default_noise_stream():
    """ComfyUI's default_noise_sampler(x, seed): a generator on x.device seeded with seed (+1 on the CPU)."""
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    got = host_sampler(kdpp.sample_euler_ancestral_distpp)(nonlinear_denoiser, x, SIGMAS, extra_args={"seed": 9}, disable=True)
    g = torch.Generator(device=x.device).manual_seed(9 + 1)
    want = ks.sample_euler_ancestral(nonlinear_denoiser, x, SIGMAS, disable=True,
                                     noise_sampler=lambda s, t: torch.randn(x.size(), dtype=x.dtype, generator=g))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_register_without_teacher_keeps_lam_k_and_options_for_a_call_time_teacher():
    """Issue 10 item 8: register(ns, lam=..., k=..., renoise=...) then a call-time teacher guides as registered."""
    ns = types.SimpleNamespace()
    register(ns, ["euler", "dpmpp_2m"], lam=0.7, k=2, renoise="deterministic")
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    teacher = Recorder(other_denoiser)
    got = ns.sample_euler_distpp(nonlinear_denoiser, x, SIGMAS, teacher=teacher, disable=True)
    want = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.7, 2, renoise="deterministic",
                                    disable=True)
    assert teacher.sigmas == [4.0, 1.5] and torch.equal(got, want)
    ns.sample_dpmpp_2m_distpp(nonlinear_denoiser, x, SIGMAS, teacher=teacher, lam=0.2, k=1, disable=True)
    assert teacher.calls == 3  # call-time lam and k override the registered ones
    fix = r"got lam=0.7 and no teacher: pass teacher=T when calling it, or bind it .*register\(namespace, ..., teacher=T\)"
    with pytest.raises(TypeError, match=fix):
        ns.sample_euler_distpp(nonlinear_denoiser, x, SIGMAS, disable=True)  # lam 0.7 and no teacher anywhere
    with pytest.raises(TypeError, match=fix):  # an A1111-style call: the registered defaults, no teacher
        a1111_call(ns.sample_euler_distpp, nonlinear_denoiser, x, SIGMAS, SETTINGS)
    with pytest.raises(TypeError, match=r"got lam=\[0.0, 0.5\] and no teacher"):
        ns.sample_euler_distpp(nonlinear_denoiser, x, SIGMAS, lam=[0.0, 0.5], disable=True)
    ns.sample_euler_distpp(nonlinear_denoiser, x, SIGMAS, lam=0.0, disable=True)  # no teacher needed


def a1111_call(fn, model, x, sigmas, settings):
    """What A1111 / Forge do: pass each setting only if inspect.signature(fn) lists it (sigmas by keyword)."""
    parameters = inspect.signature(fn).parameters
    kwargs = {name: value for name, value in {"sigmas": sigmas, **settings}.items() if name in parameters}
    return fn(model, x, extra_args={}, disable=True, callback=None, **kwargs)


# s_tmin / s_tmax churn every step here: k-diffusion draws (and drops) churn noise on unchurned steps too
SETTINGS = {"eta": 0.4, "s_churn": 1.0, "s_tmin": 0.3, "s_tmax": 20.0, "s_noise": 0.9}


@pytest.mark.parametrize("name, theirs", PAIRS, ids=[p[0] for p in PAIRS])
@pytest.mark.parametrize("form", ["bind", "host_sampler", "register"])
def test_hosted_signatures_list_the_samplers_own_options(name, theirs, form):
    """Issue 10 item 9: bound, hosted and registered samplers take eta, s_churn, s_noise, ... exactly where
    k-diffusion's sampler of the same name does, so A1111 / Forge pass them, and they take effect."""
    if form == "bind":
        fn = bind(kdpp.SAMPLERS[name], other_denoiser, 0.0)
    elif form == "host_sampler":
        fn = host_sampler(kdpp.SAMPLERS[name])
    else:
        ns = types.SimpleNamespace()
        register(ns, [name])
        fn = getattr(ns, f"sample_{name}_distpp")
    ours, kd = inspect.signature(fn).parameters, inspect.signature(theirs).parameters
    assert list(ours)[:6] == list(kd)[:6] == ["model", "x", "sigmas", "extra_args", "callback", "disable"]
    assert set(kd) <= set(ours)  # every option of k-diffusion's sampler, with its default
    assert all(ours[p].default == kd[p].default for p in kd if p != "noise_sampler" and kd[p].default is not kd[p].empty)
    assert {"teacher", "lam", "k", "guided_steps", "renoise", "renoise_seed"} <= set(ours)
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    torch.manual_seed(0)
    got = a1111_call(fn, nonlinear_denoiser, x, SIGMAS, SETTINGS)
    torch.manual_seed(0)
    want = a1111_call(theirs, nonlinear_denoiser, x, SIGMAS, SETTINGS)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if set(SETTINGS) & set(kd):  # the settings changed the result
        torch.manual_seed(0)
        assert not torch.equal(got, theirs(nonlinear_denoiser, x, SIGMAS, disable=True))


def test_hosted_signatures_refuse_unknown_options():
    fn = bind(kdpp.sample_euler_distpp, other_denoiser, 0.5)
    with pytest.raises(TypeError, match="eta"):
        fn(nonlinear_denoiser, torch.randn(2, 3), SIGMAS, eta=0.5)
    with pytest.raises(TypeError, match="sample_euler_distpp has no option 'eta'"):
        bind(kdpp.sample_euler_distpp, other_denoiser, 0.5, eta=0.5)
    with pytest.raises(TypeError, match="has no option 'eta'"):
        register(types.SimpleNamespace(), ["euler_ancestral", "euler"], eta=0.5)


def test_host_seed_leaves_a_given_renoise_noise_sampler_alone():
    """extra_args['seed'] derives a renoise seed only when the caller gave no renoise_noise_sampler of its own
    (the two together are refused as contradictory)."""
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    sigmas = torch.tensor([10.0, 3.0, 1.0, 0.0], dtype=torch.float64)
    draws = []

    def renoise(sigma, tau):
        draws.append(tau)
        return torch.zeros_like(x)

    sample = bind(kdpp.sample_euler_distpp, other_denoiser, 0.5, renoise_noise_sampler=renoise)
    sample(nonlinear_denoiser, x, sigmas, extra_args={"seed": 3}, disable=True)
    assert draws == [3.0]
