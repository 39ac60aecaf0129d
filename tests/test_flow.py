"""kdpp.flow: rectified-flow models as VE denoisers (one wrapper, FlowDenoiser), the start at t = 1, dtypes."""
import pytest
import torch

import kdpp
from kdpp.flow import T_MAX, FlowDenoiser, RFHostFrame, flow_sigmas, initial_noise_scale
from kdpp.toy import ring

MIX = ring()
TEACHER = MIX.shifted(std_scale=0.9)


def as_velocity(denoiser):
    """A VE denoiser written as an RF velocity model v = (x_rf - x0) / t (the test's stand-in for a flow network)."""
    def v(x_rf, t):
        t = t.double()
        sigma = t / (1 - t)
        return (x_rf - denoiser(x_rf / (1 - t[:, None]), sigma)) / t[:, None]
    return v


def as_x0(denoiser):
    return lambda x_rf, t: denoiser(x_rf / (1 - t.double()[:, None]), t.double() / (1 - t.double()))


def test_the_start_at_t_1_is_capped_where_float32_still_reads_1():
    """t = 1 becomes T_MAX = 1 - 2^-30 (sigma 2^30 - 1): 1.0 in float32, and the start scale 2^30 maps x_rf = eps exactly."""
    ts = torch.tensor([1.0, 0.75, 0.5, 0.0])
    sigmas = flow_sigmas(ts)
    assert sigmas.dtype == torch.float64 and sigmas[0] == 2.0**30 - 1 and sigmas[-1] == 0
    torch.testing.assert_close(sigmas[1:], torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
    assert initial_noise_scale(ts) == 2.0**30 and float(torch.tensor(T_MAX, dtype=torch.float32)) == 1.0
    seen = []
    eps = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    FlowDenoiser(lambda x_rf, t: seen.append((x_rf, t)) or x_rf)(eps * initial_noise_scale(ts), sigmas[:1].float().expand(2))
    assert torch.equal(seen[0][0], eps) and torch.equal(seen[0][1], torch.ones(2))  # the pipeline's own first call
    with pytest.raises(ValueError, match=r"ts must lie in \[0, 1\]"):
        flow_sigmas(torch.tensor([1.5, 0.0]))
    with pytest.raises(ValueError, match=r"t_max must be in \(0, 1\)"):
        flow_sigmas(ts, t_max=1.0)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_rf_form_of_the_toy_gives_the_ve_samples(name, prediction):
    """Student and teacher as RF velocity (or x0) models, wrapped back to VE: the same samples as the VE models."""
    wrap = as_velocity if prediction == "velocity" else as_x0
    ts = torch.tensor([0.99, 0.8, 0.6, 0.3, 0.0], dtype=torch.float64)
    sigmas = flow_sigmas(ts)
    x_ve = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(1 + sigmas[0])
    sampler = kdpp.SAMPLERS[name]
    ve = sampler(MIX.denoiser, TEACHER.denoiser, x_ve, sigmas, 0.7, 2, seed=2, disable=True)
    rf = sampler(FlowDenoiser(wrap(MIX.denoiser), prediction), FlowDenoiser(wrap(TEACHER.denoiser), prediction), x_ve,
                 sigmas, 0.7, 2, seed=2, disable=True)
    torch.testing.assert_close(rf, ve, rtol=0, atol=1e-9)


def test_flow_denoiser_refuses_what_it_cannot_wrap():
    with pytest.raises(ValueError, match=r"prediction must be one of \('velocity', 'x0'\), got 'eps'"):
        FlowDenoiser(lambda x, t: x, "eps")
    with pytest.raises(TypeError, match="model must be a callable f"):
        FlowDenoiser("unet")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_the_model_the_float32_times(dtype):
    """t comes from sigma in at least float32: the same values for a float16/bfloat16 x as for float32."""
    seen = {}

    def model(x_rf, t):
        seen.setdefault(x_rf.dtype, []).append((x_rf.clone(), t.clone()))
        return 0.5 * x_rf

    start = 2.0**24 - 1 if dtype == torch.bfloat16 else 999.0  # a large x overflows float16
    sigma = torch.tensor([start, 6.0, 0.37, 1e-3], dtype=torch.float32)
    x = torch.randn(4, 3, 8) * (1 + sigma[:, None, None])
    out32, out16 = FlowDenoiser(model)(x, sigma), FlowDenoiser(model)(x.to(dtype), sigma)
    (x32, t32), (x16, t16) = seen[torch.float32][0], seen[dtype][0]
    assert torch.equal(t16, t32) and t16.dtype == torch.float32
    torch.testing.assert_close(x16.float(), x32, rtol=1e-2, atol=1e-2)
    assert out16.dtype == dtype
    torch.testing.assert_close(out16.float(), out32, rtol=1e-2, atol=1e-2)
    t_half_sigma = []
    FlowDenoiser(lambda x_rf, t: t_half_sigma.append(t) or x_rf)(x.to(dtype), sigma.to(dtype))
    assert t_half_sigma[0].dtype == torch.float32  # a half sigma is widened before t is computed


def test_host_frame_models_get_the_hosts_dtypes_from_a_float64_run():
    """RFHostFrame: the VE run is float64; the model still gets x in the host's dtype and t in the schedule's."""
    ts = torch.tensor([1.0, 0.6, 0.0], dtype=torch.float32)
    x_rf = torch.randn(2, 3, dtype=torch.float16)
    frame = RFHostFrame(ts, x_rf)
    seen = []
    denoiser = frame.denoiser(lambda x, t: seen.append((x.dtype, t.dtype, t)) or x)
    out = denoiser(frame.to_ve(x_rf), frame.sigmas[:1].expand(2))
    assert seen[0][:2] == (torch.float16, torch.float32) and torch.equal(seen[0][2], torch.ones(2))
    assert out.dtype == torch.float64 and frame.denoiser(None) is None


def test_guided_and_uncond_is_converted_like_the_call():
    """A flow CFG student keeps guided_and_uncond (CFG++ in a flow host): both estimates come back as VE x0s."""
    class CFGFlow:
        def __call__(self, x_rf, t):
            return 2 * x_rf

        def guided_and_uncond(self, x_rf, t):
            return 2 * x_rf, 3 * x_rf

    x, sigma = torch.randn(2, 3, dtype=torch.float64), torch.tensor([1.0, 3.0], dtype=torch.float64)
    wrapped = FlowDenoiser(CFGFlow(), "x0")
    guided, uncond = wrapped.guided_and_uncond(x, sigma)
    torch.testing.assert_close(guided, wrapped(x, sigma))
    torch.testing.assert_close(uncond, 1.5 * guided)
    assert not hasattr(FlowDenoiser(lambda x_rf, t: x_rf), "guided_and_uncond")
