"""One guided step of each solver on Gaussian data, against its closed form.

Data N(mu, s^2 I) has the exact linear denoiser D(y, t) = mu + s^2 / (s^2 + t^2) (y - mu).
The teacher is exact for N(mu_t, s_t^2), the student for a shifted N(mu_s, s_s^2): its
error is known. The references below are docs/method.md's formulas written out directly.
"""
import math

import pytest
import torch

import kdpp
from kdpp.toy import GaussianMixture

MU_T, S_T = torch.tensor([1.0, -2.0], dtype=torch.float64), 0.5
MU_S, S_S = torch.tensor([1.6, -1.2], dtype=torch.float64), 0.8
LAM = 0.6


def exact(mu, s):
    return lambda y, t: mu + s**2 / (s**2 + t**2) * (y - mu)


D_T, D_S = exact(MU_T, S_T), exact(MU_S, S_S)
TEACHER = GaussianMixture(MU_T[None], [S_T]).denoiser
STUDENT = GaussianMixture(MU_S[None], [S_S]).denoiser


def fixed_noise(z):
    return lambda sigma, sigma_next: z


@pytest.fixture
def x0():
    return torch.tensor([[7.0, -3.0], [-4.0, 9.5], [0.3, 0.2]], dtype=torch.float64)


def ancestral(s0, s1):
    up = min(s1, (s1**2 * (s0**2 - s1**2) / s0**2) ** 0.5)
    return (s1**2 - up**2) ** 0.5, up


def refine(D, point, tau):
    return D + LAM * (D_T(point, tau) - D)


S0, S1, S2 = 6.0, 1.5, 0.4


def test_euler_deterministic(x0):
    D = D_S(x0, S0)
    eps = (x0 - D) / S0
    want = refine(D, D + S1 * eps, S1) + S1 * eps
    got = kdpp.sample_euler_distpp(STUDENT, TEACHER, x0, [S0, S1], LAM, renoise="deterministic", disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_euler_guidance_form(x0):
    """Paper eq. 10: R = D + lam (T(x_i, s_i) - S(x_i, s_i))."""
    D = D_S(x0, S0)
    want = D + LAM * (D_T(x0, S0) - D) + S1 * (x0 - D) / S0
    got = kdpp.sample_euler_distpp(STUDENT, TEACHER, x0, [S0, S1], LAM, renoise="guidance", disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_euler_ancestral_deterministic(x0):
    z = torch.randn_like(x0)
    down, up = ancestral(S0, S1)
    D = D_S(x0, S0)
    eps = (x0 - D) / S0
    want = refine(D, D + S1 * eps, S1) + down * eps + up * z
    got = kdpp.sample_euler_ancestral_distpp(STUDENT, TEACHER, x0, [S0, S1], LAM, renoise="deterministic",
                                             noise_sampler=fixed_noise(z), disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_dpmpp_2s_ancestral_deterministic(x0):
    z = torch.randn_like(x0)
    down, up = ancestral(S0, S1)
    mid = math.sqrt(S0 * down)
    D1 = D_S(x0, S0)
    e1 = (x0 - D1) / S0
    x_mid = refine(D1, D1 + mid * e1, mid) + mid * e1
    D2 = D_S(x_mid, mid)
    e2 = (x_mid - D2) / mid
    want = refine(D2, D2 + S1 * e2, S1) + down * (x0 - D2) / S0 + up * z
    got = kdpp.sample_dpmpp_2s_ancestral_distpp(STUDENT, TEACHER, x0, [S0, S1], LAM, renoise="deterministic",
                                                noise_sampler=fixed_noise(z), disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_dpmpp_2m_deterministic_with_unrefined_history(x0):
    D0 = D_S(x0, S0)
    e0 = (x0 - D0) / S0
    x1 = refine(D0, D0 + S1 * e0, S1) + S1 * e0
    D1 = D_S(x1, S1)
    r = math.log(S0 / S1) / math.log(S1 / S2)
    want = D1 + S2 * (x1 - D1) / S1 + (1 - S2 / S1) * (D1 - D0) / (2 * r)
    got = kdpp.sample_dpmpp_2m_distpp(STUDENT, TEACHER, x0, [S0, S1, S2], LAM, 1, renoise="deterministic", disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_lcm_deterministic(x0):
    z = torch.randn_like(x0)
    D = D_S(x0, S0)
    want = refine(D, D + S1 * (x0 - D) / S0, S1) + S1 * z
    got = kdpp.sample_lcm_distpp(STUDENT, TEACHER, x0, [S0, S1], LAM, renoise="deterministic",
                                 noise_sampler=fixed_noise(z), disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


def test_several_teachers_are_a_weighted_sum_of_revisions(x0):
    mu2, s2 = torch.tensor([-1.0, 0.5], dtype=torch.float64), 1.1
    D = D_S(x0, S0)
    eps = (x0 - D) / S0
    p = D + S1 * eps
    want = D + 0.3 * (D_T(p, S1) - D) + 0.5 * (exact(mu2, s2)(p, S1) - D) + S1 * eps
    teachers = [TEACHER, GaussianMixture(mu2[None], [s2]).denoiser]
    got = kdpp.sample_euler_distpp(STUDENT, teachers, x0, [S0, S1], [0.3, 0.5], renoise="deterministic", disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("sampler", [kdpp.sample_euler_distpp, kdpp.sample_lcm_distpp])
def test_random_renoise_moments(sampler):
    """xi ~ N(0, I): R = D + lam (mu_t + a (D + tau xi - mu_t) - D), a = s_t^2 / (s_t^2 + tau^2)."""
    n = 40000
    x0 = torch.tensor([[5.0, -3.0]], dtype=torch.float64).expand(n, 2)
    z = torch.zeros_like(x0)  # no solver noise: the spread is the renoise noise alone
    D = D_S(x0[:1], S0)
    a = S_T**2 / (S_T**2 + S1**2)
    direction = S1 * (x0[:1] - D) / S0 if sampler is kdpp.sample_euler_distpp else 0.0
    mean = D + LAM * (MU_T + a * (D - MU_T) - D) + direction
    std = LAM * a * S1
    options = {} if sampler is kdpp.sample_euler_distpp else {"noise_sampler": fixed_noise(z)}
    got = sampler(STUDENT, TEACHER, x0, [S0, S1], LAM, seed=3, disable=True, **options)
    se = std / math.sqrt(n)
    assert (got.mean(0) - mean[0]).abs().max() < 5 * se
    torch.testing.assert_close(got.std(0), torch.full((2,), std, dtype=torch.float64), rtol=0.03, atol=0)


def test_euler_cfg_pp_deterministic(x0):
    """CFG++: x_{i+1} = R(D_w) + s_{i+1} (x_i - D_u) / s_i, the teacher renoised with the uncond noise."""
    w = 0.4
    mu_c = MU_S.expand(3, 2)
    mu_u = torch.tensor([-0.5, 0.5], dtype=torch.float64).expand(3, 2)

    def model(y, t, mu):
        return mu + S_S**2 / (S_S**2 + t[:, None] ** 2) * (y - mu)

    student = kdpp.CFGDenoiser(model, scale=w)
    Du, Dc = exact(mu_u, S_S)(x0, S0), exact(mu_c, S_S)(x0, S0)
    Dw = Du + w * (Dc - Du)
    eps_u = (x0 - Du) / S0
    want = refine(Dw, Dw + S1 * eps_u, S1) + S1 * eps_u
    got = kdpp.sample_euler_cfg_pp_distpp(student, TEACHER, x0, [S0, S1], LAM, renoise="deterministic",
                                          extra_args={"cond": {"mu": mu_c}, "uncond": {"mu": mu_u}},
                                          teacher_extra_args={}, disable=True)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
