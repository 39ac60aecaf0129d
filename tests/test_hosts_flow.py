"""kdpp.hosts on rectified-flow hosts (ComfyUI's CONST models): x in the RF frame, sigmas are t."""
import pytest
import torch

import kdpp
from kdpp.comfyui.host import COMFYUI
from kdpp.hosts import KDIFFUSION, host_of, host_sampler

MEAN, STD = 1.0, 0.5


def rf_gaussian_x0(x, t, **extra):
    """E[x0 | x_rf] for data N(MEAN, STD^2) and x_rf = (1 - t) x0 + t eps (exact)."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    gain = (1 - t) * STD**2 / ((1 - t) ** 2 * STD**2 + t**2)
    return MEAN + gain * (x - (1 - t) * MEAN)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_flow_host_at_lam_zero_samples_the_data_distribution(name):
    """At lam = 0 every solver hosted on a flow model samples the data's mean and spread (VE arithmetic applied to
    the rectified-flow x would not: euler_ancestral then lands at a mean of 1.6, lcm at 3.3)."""
    ts = torch.linspace(1, 0, 9)  # starts at t = 1 (pure noise), as ComfyUI's flow schedules do
    x = torch.randn(40000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float32)  # x_rf at t = 1
    out = host_sampler(kdpp.SAMPLERS[name])(rf_gaussian_x0, x, ts, seed=3, disable=True, flow=True)
    assert out.dtype == x.dtype and out.shape == x.shape
    # every step maps the mean exactly (to the 1e-9 of the capped t = 1); 8 ODE steps leave a
    # discretisation error in the spread
    assert abs(out.mean().item() - MEAN) < 0.01, out.mean()
    assert abs(out.std().item() - (lcm_std(ts) if name == "lcm" else STD)) < (0.01 if name == "lcm" else 0.15), out.std()


def lcm_std(ts):
    """Closed form for lcm: D_i ~ N(MEAN, v_i) and x_{i+1} = (1 - t') D_i + t' z (x_0 = z at t = 1)."""
    var_x = 1.0
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        gain = (1 - t) * STD**2 / ((1 - t) ** 2 * STD**2 + t**2)
        var_d = gain**2 * var_x
        var_x = (1 - t_next) ** 2 * var_d + t_next**2
    return var_d**0.5


def test_flow_euler_equals_rf_euler_and_without_flow_ancestral_is_wrong():
    """Deterministic Euler is frame-free (x' = x + (x - D)(t' - t) / t); noise-adding steps are not."""
    ts = torch.tensor([1.0, 0.8, 0.5, 0.25, 0.1, 0.0])
    x = torch.randn(2000, 1, generator=torch.Generator().manual_seed(1))
    got = host_sampler(kdpp.sample_euler_distpp)(rf_gaussian_x0, x, ts, disable=True, flow=True)
    want = x.double()
    for t, t_next in zip(ts[:-1].double(), ts[1:].double()):
        want = want + (want - rf_gaussian_x0(want, t.expand(len(x)))) / t * (t_next - t)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    wrong = host_sampler(kdpp.sample_euler_ancestral_distpp)(rf_gaussian_x0, x, ts, seed=3, disable=True)
    assert abs(wrong.mean().item() - MEAN) > 0.3  # the VE ancestral step applied to an RF x


def test_flow_callbacks_report_the_host_frame():
    ts = torch.tensor([1.0, 0.6, 0.3, 0.0])
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    seen = []
    host_sampler(kdpp.sample_euler_distpp)(rf_gaussian_x0, x, ts, callback=seen.append, disable=True, flow=True)
    assert [float(s["sigma"]) for s in seen] == pytest.approx([1.0, 0.6, 0.3])
    torch.testing.assert_close(seen[0]["x"], x)
    assert all(s["x"].dtype == x.dtype and s["denoised"].dtype == x.dtype for s in seen)


def test_plain_callables_are_k_diffusion_models_in_the_ve_frame():
    assert not COMFYUI.owns(rf_gaussian_x0) and not COMFYUI.owns(object())
    assert host_of(rf_gaussian_x0) is KDIFFUSION and not KDIFFUSION.is_flow(rf_gaussian_x0)


def test_flow_callbacks_report_the_renoise_level_in_the_host_frame():
    """renoise_sigma (present on steps that called the teacher) is the host's t, like sigma: 'current' gives sigma's t."""
    ts = torch.tensor([0.9, 0.6, 0.3, 0.0])
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(2))
    seen = []
    host_sampler(kdpp.sample_euler_distpp)(rf_gaussian_x0, x, ts, callback=seen.append, disable=True, flow=True,
                                           teacher=rf_gaussian_x0, lam=0.5, k=2, renoise_sigma="current")
    assert [s["renoise_sigma"] for s in seen[:2]] == pytest.approx([0.9, 0.6], rel=1e-6)
    assert "renoise_sigma" not in seen[2] and "teacher_denoised" not in seen[2]
    nxt = []
    host_sampler(kdpp.sample_euler_distpp)(rf_gaussian_x0, x, ts, callback=nxt.append, disable=True, flow=True,
                                           teacher=rf_gaussian_x0, lam=0.5, k=1)
    assert nxt[0]["renoise_sigma"] == pytest.approx(0.6, rel=1e-6)


def test_flow_callbacks_convert_per_item_random_levels():
    """With per-item random levels the VE run reports a [B] tensor; the flow frame converts each item to its t."""
    ts = torch.tensor([0.9, 0.6, 0.3, 0.0])
    x = torch.randn(3, 1, generator=torch.Generator().manual_seed(2))
    seen, levels = [], []

    def teacher(x_rf, t, **extra):
        levels.append(t.clone())
        return rf_gaussian_x0(x_rf, t, **extra)

    host_sampler(kdpp.sample_euler_distpp)(rf_gaussian_x0, x, ts, callback=seen.append, disable=True, flow=True,
                                           teacher=teacher, lam=0.5, renoise_sigma="random", seed=[1, 2, 3])
    tau = seen[0]["renoise_sigma"]
    assert isinstance(tau, torch.Tensor) and tau.shape == (3,)
    torch.testing.assert_close(tau.double(), levels[0].double().reshape(-1), rtol=1e-6, atol=0)
