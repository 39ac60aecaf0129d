"""The solvers on the analytic testbed: convergence order, reaching the target, and the teacher's pull."""

import numpy as np
import pytest
import torch

import kdpp
from kdpp.toy import FlowMapStudent, mmd_rbf, mode_coverage, ring, truncated_flow_map_student

MIX = ring()


def geometric(n, s_max=20.0, s_min=0.1):
    return torch.tensor([s_max * (s_min / s_max) ** (j / n) for j in range(n + 1)], dtype=torch.float64)


def fitted_order(sampler, counts=(32, 64, 128, 256), **options):
    """Slope of -log(error) against log(steps), the error measured against the exact flow map."""
    x = torch.randn(300, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 20
    exact = MIX.flow_map(x, 20.0, 0.1)
    errors = [float((sampler(MIX.denoiser, None, x, geometric(n), 0.0, disable=True, **options) - exact).abs().mean())
              for n in counts]
    return -np.polyfit(np.log(counts), np.log(errors), 1)[0]


@pytest.mark.parametrize("sampler, options, order", [
    (kdpp.sample_euler_distpp, {}, 1),
    (kdpp.sample_dpmpp_2m_distpp, {}, 2),
    (kdpp.sample_dpmpp_2s_ancestral_distpp, {"eta": 0.0}, 2),
], ids=["euler", "dpmpp_2m", "dpmpp_2s_eta0"])
def test_convergence_order_against_the_exact_flow_map(sampler, options, order):
    slope = fitted_order(sampler, **options)
    assert abs(slope - order) < 0.25, slope


def _reaches(samples, seed=1):
    """The samples are as close to the truth as a same-size sample of the truth is (MMD CI holds 0)."""
    est = mmd_rbf(samples, MIX.sample(len(samples), torch.Generator().manual_seed(seed)))
    return est.low <= 0 <= est.high, est


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [kdpp.sample_euler_ancestral_distpp, kdpp.sample_dpmpp_2s_ancestral_distpp],
                         ids=["euler_ancestral", "dpmpp_2s_ancestral"])
def test_ancestral_samplers_reach_the_target_with_many_steps(sampler):
    x = torch.randn(1500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 40
    sigmas = torch.cat([geometric(150, 40.0, 0.01), torch.zeros(1, dtype=torch.float64)])
    out = sampler(MIX.denoiser, None, x, sigmas, 0.0, noise_sampler=kdpp.seeded_noise_sampler(x, 3), disable=True)
    ok, est = _reaches(out)
    assert ok, est


@pytest.mark.slow  # 1500 points through the exact flow map; quick: lcm pulled to the truth by the exact teacher
def test_consistency_sampling_with_the_exact_flow_map_reaches_the_target_in_four_steps():
    x = torch.randn(1500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 40
    out = kdpp.sample_lcm_distpp(FlowMapStudent(MIX), None, x, [40.0, 4.0, 1.6, 0.7, 0.0], 0.0,
                                 noise_sampler=kdpp.seeded_noise_sampler(x, 3), disable=True)
    ok, est = _reaches(out)
    assert ok, est


def test_truncated_student_error_shrinks_with_its_steps():
    x = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    sigma = torch.full((200,), 5.0, dtype=torch.float64)
    exact = MIX.flow_map(x, 5.0, 0.0)
    errors = [float((truncated_flow_map_student(MIX, n)(x, sigma) - exact).norm(dim=1).mean()) for n in (1, 4, 16, 64)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert torch.equal(truncated_flow_map_student(MIX, 1)(x, sigma), MIX.denoiser(x, sigma))


SD_4STEP = [14.615, 4.082, 1.613, 0.693, 0.0]  # SD/SDXL trailing t = 999, 749, 499, 249


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_exact_teacher_pulls_a_biased_student_toward_the_truth(name):
    """A student trained on the wrong mode weights (distribution shift); one teacher-guided step repairs mode mass."""
    sampler = kdpp.SAMPLERS[name]
    student = MIX.shifted(weights=torch.linspace(1.0, 4.0, MIX.K)).denoiser
    x = torch.randn(3000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * SD_4STEP[0]
    options = {} if name == "dpmpp_2m" else {"noise_sampler": kdpp.seeded_noise_sampler(x, 0)}
    plain = sampler(student, MIX.denoiser, x, SD_4STEP, 0.0, disable=True, **options)
    guided = sampler(student, MIX.denoiser, x, SD_4STEP, 1.0, 2, seed=1, disable=True, **options)
    before, after = mode_coverage(plain, MIX), mode_coverage(guided, MIX)
    assert after.high < before.low, (before, after)
