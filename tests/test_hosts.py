"""The k-diffusion host convention: bind, register, host_sampler in k-diffusion and A1111 / Forge-style hosts.

(ComfyUI's host is tested inside a real ComfyUI: tests/test_comfyui.py.)
"""
import collections
import inspect
import types

import pytest
import torch

import kdpp
from kdpp.hosts import bind, host_sampler, register
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
SIGMAS = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.0], dtype=torch.float64)


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
    names = register(ns, teacher=other_denoiser, lam=0.5, k=1, seed=3)
    assert names == [f"sample_{name}_distpp" for name in ("euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m",
                                                          "lcm")]  # the CFG++ forms only by name
    assert register(ns, ["dpmpp_2m_cfg_pp_guided_history"]) == ["sample_dpmpp_2m_cfg_pp_guided_history_distpp"]
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    fn = getattr(ns, "sample_" + "euler_distpp")
    torch.testing.assert_close(fn(nonlinear_denoiser, x, SIGMAS, disable=True),
                               kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, 1,
                                                        seed=3, disable=True), rtol=0, atol=0)
    module = types.ModuleType("k_diffusion_like")
    register(module, ["lcm"])  # unbound: the teacher comes at call time
    teacher = Recorder(other_denoiser)
    out = module.sample_lcm_distpp(nonlinear_denoiser, x, SIGMAS, teacher=teacher, lam=0.5, seed=4, disable=True)
    want = kdpp.sample_lcm_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, seed=4, disable=True)
    assert teacher.sigmas == [4.0] and torch.equal(out, want)
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


def test_register_without_teacher_keeps_lam_k_and_options_for_a_call_time_teacher():
    """register(ns, lam=..., k=..., renoise=...) then a call-time teacher guides as registered."""
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
        ns.sample_euler_distpp(nonlinear_denoiser, x, sigmas=SIGMAS, extra_args={}, disable=True, callback=None)
    with pytest.raises(TypeError, match=r"got lam=\[0.0, 0.5\] and no teacher"):
        ns.sample_euler_distpp(nonlinear_denoiser, x, SIGMAS, lam=[0.0, 0.5], disable=True)
    ns.sample_euler_distpp(nonlinear_denoiser, x, SIGMAS, lam=0.0, disable=True)  # no teacher needed


class A1111Hijack:
    """A1111 / Forge replace ``k_diffusion.sampling.torch`` with an object whose ``randn_like`` hands out the noises
    precomputed from the images' seeds (``modules/sd_samplers_kdiffusion.py``: ``TorchHijack``, set in
    ``KDiffusionSampler.initialize``); every other attribute is torch's."""

    def __init__(self, noises):
        self.noises = collections.deque(noises)

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x):
        noise = self.noises.popleft() if self.noises else None
        return noise if noise is not None and noise.shape == x.shape else torch.randn_like(x)


#: A1111's sampler_extra_params: s_churn & co. are passed only to these functions, by name
A1111_EXTRA_PARAMS = {"sample_euler": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
                      "sample_heun": ["s_churn", "s_tmin", "s_tmax", "s_noise"],
                      "sample_dpm_2": ["s_churn", "s_tmin", "s_tmax", "s_noise"]}


def a1111_call(funcname, model, x, sigmas, settings, noises=()):
    """What A1111 / Forge do to call ``getattr(k_diffusion.sampling, funcname)``: hijack its torch with the seeded
    noises, pass s_churn & co. only where A1111_EXTRA_PARAMS lists the function's name (and its signature has
    them), eta wherever the signature has it, sigmas by keyword."""
    fn = getattr(ks, funcname)
    parameters = inspect.signature(fn).parameters
    kwargs = {name: settings[name] for name in A1111_EXTRA_PARAMS.get(funcname, []) if name in parameters}
    if "eta" in parameters:
        kwargs["eta"] = settings["eta"]
    saved, ks.torch = ks.torch, A1111Hijack(noises)
    try:
        return fn(model, x, sigmas=sigmas, extra_args={}, disable=True, callback=None, **kwargs)
    finally:
        ks.torch = saved


SETTINGS = {"eta": 0.4, "s_churn": 1.0, "s_tmin": 0.3, "s_tmax": 20.0, "s_noise": 0.9}


@pytest.fixture
def registered():
    names = register(ks)
    yield names
    for name in names:
        delattr(ks, name)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m"])
def test_in_an_a1111_style_host_lam_zero_is_the_hosts_sampler_under_its_seeded_rng(name, registered):
    """Registered into k_diffusion.sampling, kdpp's samplers draw the host's hijacked, seeded noise, so at lam = 0
    they equal the host's built-in sampler of the same name, called the way the host calls it."""
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    noises = [torch.randn(3, 4, generator=torch.Generator().manual_seed(100 + j), dtype=torch.float64)
              for j in range(len(SIGMAS))]
    want = a1111_call(f"sample_{name}", nonlinear_denoiser, x, SIGMAS, SETTINGS, noises)
    got = a1111_call(f"sample_{name}_distpp", nonlinear_denoiser, x, SIGMAS, SETTINGS, noises)
    if name == "euler":  # A1111 passes s_churn & co. to sample_euler by name, never to sample_euler_distpp
        want = a1111_call("sample_euler", nonlinear_denoiser, x, SIGMAS, {**SETTINGS, "s_churn": 0.0}, noises)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if name not in ("euler", "dpmpp_2m"):  # the hijacked noise was used: other noises give another result
        other = [n + 1 for n in noises]
        assert not torch.allclose(got, a1111_call(f"sample_{name}_distpp", nonlinear_denoiser, x, SIGMAS, SETTINGS, other))


def test_options_a1111_does_not_pass_are_bound_at_registration():
    """A1111 passes s_noise only to sample_euler / heun / dpm_2 by name: for kdpp's samplers bind it instead."""
    ns = types.SimpleNamespace()
    register(ns, ["euler_ancestral"], s_noise=0.5)
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    torch.manual_seed(0)
    got = ns.sample_euler_ancestral_distpp(nonlinear_denoiser, x, SIGMAS, disable=True)
    torch.manual_seed(0)
    torch.testing.assert_close(got, ks.sample_euler_ancestral(nonlinear_denoiser, x, SIGMAS, s_noise=0.5, disable=True),
                               rtol=0, atol=1e-12)


PLAIN_PAIRS = [(name, getattr(ks, f"sample_{name}")) for name in ("euler", "euler_ancestral", "dpmpp_2s_ancestral",
                                                                    "dpmpp_2m")]


@pytest.mark.parametrize("name, theirs", PLAIN_PAIRS, ids=[p[0] for p in PLAIN_PAIRS])
@pytest.mark.parametrize("form", ["bind", "host_sampler", "register"])
def test_hosted_signatures_list_the_samplers_own_options(name, theirs, form):
    """Bound, hosted and registered samplers take eta, s_churn, s_noise, ... with k-diffusion's defaults, as keywords
    that a host can pass (inspect.signature lists them), and they take effect."""
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
    assert {"teacher", "lam", "k", "guided_steps", "renoise", "seed", "full_sigmas", "step_offset"} <= set(ours)
    settings = {key: v for key, v in SETTINGS.items() if key in kd}
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    torch.manual_seed(0)
    got = fn(nonlinear_denoiser, x, SIGMAS, disable=True, **settings)
    torch.manual_seed(0)
    want = theirs(nonlinear_denoiser, x, SIGMAS, disable=True, **settings)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    if settings:  # the settings changed the result
        torch.manual_seed(0)
        assert not torch.equal(got, theirs(nonlinear_denoiser, x, SIGMAS, disable=True))


def test_hosted_signatures_refuse_unknown_options_naming_the_sampler():
    fn = bind(kdpp.sample_euler_distpp, other_denoiser, 0.5)
    with pytest.raises(TypeError, match=r"^sample_euler_distpp: .*'eta'"):
        fn(nonlinear_denoiser, torch.randn(2, 3), SIGMAS, eta=0.5)
    with pytest.raises(TypeError, match="sample_euler_distpp has no option 'eta'"):
        bind(kdpp.sample_euler_distpp, other_denoiser, 0.5, eta=0.5)
    with pytest.raises(TypeError, match="has no option 'eta'"):
        register(types.SimpleNamespace(), ["euler_ancestral", "euler"], eta=0.5)


def test_a_bound_samplers_call_time_errors_name_it():
    fn = bind(kdpp.sample_lcm_distpp, lambda x, sigma: other_denoiser(x, sigma), 0.5)
    with pytest.raises(ValueError, match=r"^sample_lcm_distpp: sigmas must be strictly decreasing"):
        fn(nonlinear_denoiser, torch.randn(2, 3), torch.tensor([0.0, 1.0, 4.0]), disable=True)
    with pytest.raises(TypeError, match=r"^sample_lcm_distpp: the teacher cannot be called as teacher\(x, sigma, "
                                        r"\*\*extra_args \(teacher_extra_args defaults to it\)\) with .* 'cond'"):
        fn(lambda x, sigma, cond: x, torch.randn(2, 3), SIGMAS, extra_args={"cond": 1}, disable=True)


@pytest.mark.parametrize("sampler", [ks.sample_euler, lambda model, x, sigmas: x, print])
def test_bind_refuses_a_function_that_is_not_a_kdpp_sampler(sampler):
    with pytest.raises(TypeError, match=r"^bind takes a kdpp sampler.*DistillationDenoiser"):
        bind(sampler, other_denoiser, 0.5)
    with pytest.raises(TypeError, match=r"^host_sampler takes a kdpp sampler.*DistillationDenoiser"):
        host_sampler(sampler)
