"""With lam = 0 (or k = 0) every kdpp solver is k-diffusion's sampler, given the same noise."""
import pytest
import torch

import kdpp
from kdpp.hosts import bind
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")

CASES = [
    (kdpp.sample_euler_distpp, ks.sample_euler, {}),
    (kdpp.sample_euler_distpp, ks.sample_euler, {"s_churn": 1.0, "s_noise": 1.003}),
    (kdpp.sample_euler_ancestral_distpp, ks.sample_euler_ancestral, {}),
    (kdpp.sample_euler_ancestral_distpp, ks.sample_euler_ancestral, {"eta": 0.5, "s_noise": 0.9}),
    (kdpp.sample_dpmpp_2s_ancestral_distpp, ks.sample_dpmpp_2s_ancestral, {}),
    (kdpp.sample_dpmpp_2s_ancestral_distpp, ks.sample_dpmpp_2s_ancestral, {"eta": 0.0}),
    (kdpp.sample_dpmpp_2s_ancestral_distpp, ks.sample_dpmpp_2s_ancestral, {"eta": 0.7, "s_noise": 1.1}),
    (kdpp.sample_dpmpp_2m_distpp, ks.sample_dpmpp_2m, {}),
]
IDS = [f"{c[1].__name__}{c[2] or ''}" for c in CASES]


def _run_both(ours, theirs, options, schedule, shape, lam, k=None, form="direct", **placement):
    """kdpp's sampler (called directly, bound with kdpp.hosts.bind, or as k-diffusion's host calls it) and
    k-diffusion's, from the same global RNG state."""
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * schedule[0]
    teacher = Recorder(other_denoiser)
    torch.manual_seed(123)
    if form == "direct":
        got = ours(nonlinear_denoiser, teacher, x, schedule, lam, k, disable=True, **placement, **options)
    else:
        fn = bind(ours, teacher, lam, k, **placement)
        got = fn(nonlinear_denoiser, x, schedule, extra_args={}, callback=None, disable=True, **options)
        assert fn.__name__ == ours.__name__
    torch.manual_seed(123)
    want = theirs(nonlinear_denoiser, x, schedule, disable=True, **options)
    return got, want, teacher


PLAIN = {"lam=0": {"lam": 0.0, "k": 3}, "k=0": {"lam": 0.7, "k": 0},
         # guided_steps: lam = 0 at the listed steps, or no step listed
         "lam=0,guided_steps": {"lam": 0.0, "guided_steps": [1, -1]},
         "lam=[0,0],guided_steps": {"lam": [0.0, 0.0], "guided_steps": [3, 0]},
         "guided_steps=[]": {"lam": 0.7, "guided_steps": []}}


@pytest.mark.parametrize("ours, theirs, options", CASES, ids=IDS)
@pytest.mark.parametrize("placement", PLAIN.values(), ids=PLAIN.keys())
@pytest.mark.parametrize("form", ["direct", "bound"])
def test_plain_student_is_kdiffusion(ours, theirs, options, schedule, placement, form):
    """Called directly or in k-diffusion's host convention (kdpp.hosts.bind): k-diffusion's sampler, no teacher call."""
    got, want, teacher = _run_both(ours, theirs, options, schedule, (3, 4, 5, 5), form=form, **placement)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert teacher.calls == 0


@pytest.mark.parametrize("ours, theirs, options", CASES[::2], ids=IDS[::2])
def test_schedule_ending_above_zero_is_kdiffusion(ours, theirs, options, schedule):
    """A positive last sigma is accepted: the run stops at that level, as in k-diffusion."""
    got, want, _ = _run_both(ours, theirs, options, schedule[:-2], (2, 3), 0.0, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_lcm_is_the_multistep_consistency_recurrence(schedule):
    x = torch.randn(4, 3, dtype=torch.float64) * schedule[0]
    torch.manual_seed(5)
    got = kdpp.sample_lcm_distpp(nonlinear_denoiser, None, x, schedule, 0.0, disable=True)
    torch.manual_seed(5)
    want = x
    for s, s_next in zip(schedule[:-1], schedule[1:]):
        want = nonlinear_denoiser(want, s * torch.ones(4, dtype=torch.float64))
        if s_next > 0:
            want = want + s_next * torch.randn_like(want)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("ours, theirs, options", CASES[::2], ids=IDS[::2])
def test_callback_carries_kdiffusion_keys(ours, theirs, options, schedule):
    seen, theirs_seen = [], []
    x = torch.randn(2, 3, dtype=torch.float64) * schedule[0]
    torch.manual_seed(0)
    ours(nonlinear_denoiser, None, x, schedule, 0.0, callback=seen.append, disable=True, **options)
    torch.manual_seed(0)
    theirs(nonlinear_denoiser, x, schedule, callback=theirs_seen.append, disable=True, **options)
    assert len(seen) == len(theirs_seen) == len(schedule) - 1
    for a, b in zip(seen, theirs_seen):
        assert set(b) <= set(a)
        assert a["i"] == b["i"]
        torch.testing.assert_close(a["x"], b["x"], rtol=0, atol=1e-12)
        torch.testing.assert_close(a["denoised"], b["denoised"], rtol=0, atol=1e-12)
        torch.testing.assert_close(torch.as_tensor(a["sigma"]), torch.as_tensor(b["sigma"]))
        assert a["student_denoised"] is a["denoised"] and "teacher_denoised" not in a


@pytest.mark.parametrize("sigma_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("ours, theirs, options", CASES, ids=IDS)
def test_callback_sigmas_are_tensors_as_in_kdiffusion(ours, theirs, options, schedule, sigma_dtype):
    """``sigma`` and ``sigma_hat`` are 0-d tensors of the schedule's dtype, as k-diffusion's."""
    seen, theirs_seen = [], []
    x = torch.randn(2, 3, dtype=torch.float64) * schedule[0]
    sigmas = schedule.to(sigma_dtype)
    torch.manual_seed(0)
    ours(nonlinear_denoiser, None, x, sigmas, 0.0, callback=seen.append, disable=True, **options)
    torch.manual_seed(0)
    theirs(nonlinear_denoiser, x, sigmas, callback=theirs_seen.append, disable=True, **options)
    for a, b in zip(seen, theirs_seen, strict=True):
        for key in ("sigma", "sigma_hat"):
            assert type(a[key]) is type(b[key]) is torch.Tensor
            assert (a[key].dtype, a[key].device, a[key].shape) == (b[key].dtype, b[key].device, b[key].shape)
            assert torch.equal(a[key], b[key])
