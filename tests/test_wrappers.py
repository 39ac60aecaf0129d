"""DistillationDenoiser: any k-diffusion sampler becomes a Distillation++ sampler."""
import pytest
import torch

import kdpp
from kdpp.toy import mode_coverage, ring
from kdpp.wrappers import DistillationDenoiser
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
SIGMAS = [10.0, 4.0, 1.5, 0.5, 0.0]


def test_one_euler_step_applies_the_correction_scaled_by_one_minus_the_ratio():
    """wrapper: x' = D + (s'/s)(x - D) + (1 - s'/s)(R - D); paper: ... + (R - D)."""
    x = torch.randn(3, 4, dtype=torch.float64) * 10
    wrapped = DistillationDenoiser(nonlinear_denoiser, other_denoiser, SIGMAS, 0.6, 1, renoise="deterministic")
    got = ks.sample_euler(wrapped, x, torch.tensor(SIGMAS[:2], dtype=torch.float64), disable=True)
    paper = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS[:2], 0.6, 1, renoise="deterministic", disable=True)
    plain = kdpp.sample_euler_distpp(nonlinear_denoiser, None, x, SIGMAS[:2], 0.0, disable=True)
    torch.testing.assert_close(got - plain, (1 - 4.0 / 10.0) * (paper - plain), rtol=0, atol=1e-12)


def test_heun_calls_the_teacher_at_the_documented_levels():
    teacher = Recorder(other_denoiser)
    wrapped = DistillationDenoiser(nonlinear_denoiser, teacher, SIGMAS, 0.5, 2)
    ks.sample_heun(wrapped, torch.randn(2, 3, dtype=torch.float64) * 10, torch.tensor(SIGMAS, dtype=torch.float64), disable=True)
    # step 0: first evaluation at 10 (tau 4); Heun's corrector at 4 belongs to step 1 (tau 1.5), as does step 1's first
    assert teacher.sigmas == [4.0, 1.5, 1.5]


def test_lam_zero_wrapper_is_the_plain_sampler():
    x = torch.randn(2, 3, dtype=torch.float64) * 10
    teacher = Recorder(other_denoiser)
    wrapped = DistillationDenoiser(nonlinear_denoiser, teacher, SIGMAS, 0.0, 4)
    s = torch.tensor(SIGMAS, dtype=torch.float64)
    torch.testing.assert_close(ks.sample_lms(wrapped, x, s, disable=True), ks.sample_lms(nonlinear_denoiser, x, s, disable=True),
                               rtol=0, atol=0)
    assert teacher.calls == 0


def test_non_finite_outputs_are_reported():
    wrapped = DistillationDenoiser(lambda x, s: x * float("nan"), other_denoiser, SIGMAS, 0.5, 1)
    ks.sample_euler(wrapped, torch.randn(2, 3) * 10, torch.tensor(SIGMAS), disable=True)
    with pytest.raises(FloatingPointError, match="student at step 0"):
        wrapped.raise_if_nonfinite()


def test_heun_with_the_guidance_form_and_teacher_equal_student_is_plain_heun():
    """R = D + lam (T(x) - S(x)) = D bit for bit when T is S: on every one of Heun's 7 evaluations, each calling it."""
    x = torch.randn(4, 3, dtype=torch.float64) * 10
    s = torch.tensor(SIGMAS, dtype=torch.float64)
    teacher = Recorder(nonlinear_denoiser)
    wrapped = DistillationDenoiser(nonlinear_denoiser, teacher, SIGMAS, 0.8, 4, renoise="guidance")
    assert torch.equal(ks.sample_heun(wrapped, x, s, disable=True), ks.sample_heun(nonlinear_denoiser, x, s, disable=True))
    assert teacher.calls == 7  # 4 steps, Heun's corrector on the first 3


# measured (docs/integrations.md): Heun's plain samples are already closer in mode mass here, and the
# wrapper does not move them significantly; Euler and DPM++ 2M SDE improve
@pytest.mark.parametrize("sampler", [ks.sample_euler, ks.sample_dpmpp_2m_sde], ids=["euler", "dpmpp_2m_sde"])
def test_wrapper_pulls_a_biased_student_toward_the_truth_on_the_toy(sampler):
    mix = ring()
    student = mix.shifted(weights=torch.linspace(1.0, 4.0, mix.K)).denoiser
    sigmas = torch.tensor([14.615, 4.082, 1.613, 0.693, 0.0], dtype=torch.float64)
    x = torch.randn(8000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    torch.manual_seed(0)
    plain = sampler(student, x, sigmas, disable=True)
    torch.manual_seed(0)
    guided = sampler(DistillationDenoiser(student, mix.denoiser, sigmas, 1.0, 2, seed=1), x, sigmas, disable=True)
    before, after = mode_coverage(plain, mix), mode_coverage(guided, mix)
    assert after.high < before.low, (before, after)
