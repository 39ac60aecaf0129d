"""Rectified-flow models through the VE wrappers give the same samples as the VE path."""
import pytest
import torch

import kdpp
from kdpp.flow import FlowDenoiser, VelocityModel, rf_to_ve, sigma_from_t, t_from_sigma, ve_to_rf
from kdpp.toy import ring

MIX = ring()
TEACHER = MIX.shifted(std_scale=0.9)


def test_sigma_t_maps_are_inverse():
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    torch.testing.assert_close(t_from_sigma(sigma_from_t(t)), t)
    x = torch.randn(4, 2, dtype=torch.float64)
    torch.testing.assert_close(ve_to_rf(rf_to_ve(x, 0.7), sigma_from_t(0.7)), x)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_rf_form_of_the_toy_gives_the_ve_samples(name, prediction):
    """Student and teacher as RF velocity (or x0) models, wrapped back to VE: same samples."""
    if prediction == "velocity":
        student_rf, teacher_rf = VelocityModel(MIX.denoiser), VelocityModel(TEACHER.denoiser)
    else:
        student_rf = lambda x_rf, t: MIX.denoiser(x_rf / (1 - t[:, None]), t / (1 - t))
        teacher_rf = lambda x_rf, t: TEACHER.denoiser(x_rf / (1 - t[:, None]), t / (1 - t))
    ts = torch.tensor([0.99, 0.8, 0.6, 0.3, 0.0], dtype=torch.float64)
    sigmas = sigma_from_t(ts)
    x_rf = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.99
    x_ve = rf_to_ve(x_rf, 0.99)
    options = lambda: {} if name == "dpmpp_2m" else {"noise_sampler": kdpp.seeded_noise_sampler(x_ve, 1)}
    sampler = kdpp.SAMPLERS[name]
    ve = sampler(MIX.denoiser, TEACHER.denoiser, x_ve, sigmas, 0.7, 2, renoise_seed=2, disable=True, **options())
    rf = sampler(FlowDenoiser(student_rf, prediction), FlowDenoiser(teacher_rf, prediction), x_ve, sigmas, 0.7, 2,
                 renoise_seed=2, disable=True, **options())
    torch.testing.assert_close(rf, ve, rtol=0, atol=1e-9)


def test_flow_denoiser_rejects_unknown_prediction():
    with pytest.raises(ValueError, match="prediction must be 'velocity' or 'x0'"):
        FlowDenoiser(lambda x, t: x, "eps")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gives_the_model_the_float32_times(dtype):
    """t comes from sigma in at least float32: the same values for a float16/bfloat16 x as for float32."""
    seen = {}

    def model(x_rf, t):
        seen.setdefault(x_rf.dtype, []).append((x_rf.clone(), t.clone()))
        return 0.5 * x_rf

    start = 2.0**24 - 1 if dtype == torch.bfloat16 else 999.0  # x = 2^24 eps overflows float16
    sigma = torch.tensor([start, 6.0, 0.37, 1e-3], dtype=torch.float32)
    x = torch.randn(4, 3, 8) * (1 + sigma[:, None, None])
    out32, out16 = FlowDenoiser(model)(x, sigma), FlowDenoiser(model)(x.to(dtype), sigma)
    (x32, t32), (x16, t16) = seen[torch.float32][0], seen[dtype][0]
    assert torch.equal(t16, t32) and t16.dtype == torch.float32
    assert dtype == torch.float16 or t32[0] == 1 - 2.0**-24  # the capped start is exact in float32
    torch.testing.assert_close(x16.float(), x32, rtol=1e-2, atol=1e-2)
    assert out16.dtype == dtype
    torch.testing.assert_close(out16.float(), out32, rtol=1e-2, atol=1e-2)
    t_half_sigma = []
    FlowDenoiser(lambda x_rf, t: t_half_sigma.append(t) or x_rf)(x.to(dtype), sigma.to(dtype))
    assert t_half_sigma[0].dtype == torch.float32  # a half sigma is widened before t is computed


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_frame_conversions_are_computed_wide(dtype):
    """rf_to_ve / ve_to_rf / VelocityModel in half precision round only their results."""
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.999, 0.5, 0.01], dtype=torch.float64)
    want = rf_to_ve(x, t)
    got = rf_to_ve(x.to(dtype), t.to(torch.float32))
    assert got.dtype == dtype
    want_rounded = rf_to_ve(x.to(dtype).double(), t)  # the input's rounding, then one rounding of the result
    torch.testing.assert_close(got.double(), want_rounded, rtol=torch.finfo(dtype).eps, atol=0)
    torch.testing.assert_close(ve_to_rf(want.to(dtype), sigma_from_t(t).float()).double(), x, rtol=2e-2, atol=2e-2)
    sigmas = []

    def denoiser(x_ve, sigma):
        sigmas.append(sigma)
        return MIX.denoiser(x_ve.double(), sigma.double()).to(x_ve.dtype)

    v = VelocityModel(denoiser)(x.to(dtype), t.to(dtype))
    assert v.dtype == dtype and sigmas[0].dtype == torch.float32  # a half t is widened before sigma is computed
    torch.testing.assert_close(sigmas[0], sigma_from_t(t.to(dtype).float()), rtol=0, atol=0)
