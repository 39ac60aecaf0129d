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
