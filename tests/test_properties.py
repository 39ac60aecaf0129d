"""Property tests over random schedules, scales and shapes (hypothesis)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdpp
from kdpp.solvers._run import ancestral_step
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")

# Neighbouring sigmas at least 0.1 % apart: DPM++ 2M's step-size ratio h_last / h is ill-conditioned for
# sigmas a few ulps apart (k-diffusion itself returns NaN for [80, nextafter(80, 0), 1, 0]).
schedules = st.lists(st.floats(0.01, 80.0), min_size=1, max_size=8, unique=True).map(
    lambda v: sorted(v, reverse=True)).filter(lambda v: all(a > b * 1.001 for a, b in zip(v, v[1:]))).map(
    lambda v: torch.tensor(v + [0.0], dtype=torch.float64))
PAIRS = {"euler_ancestral": ks.sample_euler_ancestral, "dpmpp_2s_ancestral": ks.sample_dpmpp_2s_ancestral,
         "dpmpp_2m": ks.sample_dpmpp_2m}


@settings(max_examples=40, deadline=None)
@given(sigmas=schedules, name=st.sampled_from(sorted(PAIRS)), eta=st.floats(0.0, 1.0), batch=st.integers(1, 3))
def test_lam_zero_is_kdiffusion_for_any_schedule(sigmas, name, eta, batch):
    x = torch.randn(batch, 3, dtype=torch.float64) * float(sigmas[0])
    options = {} if name == "dpmpp_2m" else {"eta": eta}
    teacher = Recorder(other_denoiser)
    torch.manual_seed(0)
    got = kdpp.SAMPLERS[name](nonlinear_denoiser, teacher, x, sigmas, 0.0, 3, disable=True, **options)
    torch.manual_seed(0)
    want = PAIRS[name](nonlinear_denoiser, x, sigmas, disable=True, **options)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert teacher.calls == 0


@pytest.mark.filterwarnings("ignore::kdpp.KdppWarning")  # lam outside 0 .. 2 on purpose
@settings(max_examples=40, deadline=None)
@given(sigmas=schedules, name=st.sampled_from(["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"]),
       lam=st.floats(-2.0, 3.0), k=st.integers(0, 9))
def test_guidance_form_with_the_student_as_teacher_never_changes_the_sample(sigmas, name, lam, k):
    x = torch.randn(2, 3, dtype=torch.float64) * float(sigmas[0])
    torch.manual_seed(1)
    plain = kdpp.SAMPLERS[name](nonlinear_denoiser, None, x, sigmas, 0.0, disable=True)
    teacher = Recorder(nonlinear_denoiser)
    torch.manual_seed(1)
    guided = kdpp.SAMPLERS[name](nonlinear_denoiser, teacher, x, sigmas, lam, k, renoise="guidance", disable=True)
    assert torch.equal(plain, guided)
    # the identity comes from T(x_i) - S(x_i) = 0, not from skipping the teacher: one call per refined estimate
    steps = range(min(k, len(sigmas) - 1)) if lam != 0 else []
    two_stage = name == "dpmpp_2s_ancestral"
    per_step = [2 if two_stage and ancestral_step(float(sigmas[i]), float(sigmas[i + 1]))[0] > 0 else 1 for i in steps]
    assert teacher.calls == sum(per_step)
