"""Per-item seeds, reusing a DistillationDenoiser, and the errors that name the option at fault
(a research user's report on the core: per-item random levels, run restarts, seed ranges, sampler
outputs, construction-time validation, lam order with guided_steps)."""
import math

import pytest
import torch

import kdpp
from kdpp.noise import seeded_noise_sampler
from kdpp.wrappers import DistillationDenoiser
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
SIGMAS = [10.0, 5.0, 2.0, 0.8, 0.3, 0.0]


def x0(batch=8, seed=0):
    return torch.randn((batch, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


# --- 1. per-item renoise_seed with renoise_sigma="random" is batch-invariant --------------------------

@pytest.mark.parametrize("sampler", [kdpp.sample_euler_distpp, kdpp.sample_dpmpp_2s_ancestral_distpp,
                                     kdpp.sample_lcm_distpp])
@pytest.mark.parametrize("renoise", ["random", "deterministic"])
def test_per_item_random_levels_do_not_depend_on_the_batch(sampler, renoise):
    """Items 3-4 of a batch of 8 equal the same items run alone (same per-item seeds, solver and renoise)."""
    x = x0()
    seeds = list(range(100, 108))

    def run(items):
        teacher, seen = Recorder(other_denoiser), []
        out = sampler(nonlinear_denoiser, teacher, x[items], SIGMAS, 0.6, 3, renoise=renoise, renoise_sigma="random",
                      renoise_seed=[seeds[j] for j in items], disable=True, callback=seen.append,
                      noise_sampler=seeded_noise_sampler(x[items], [seeds[j] + 50 for j in items]))
        return out, teacher, [d["renoise_sigma"] for d in seen if "renoise_sigma" in d]

    batch, teacher_b, levels_b = run(list(range(8)))
    alone, teacher_a, levels_a = run([3, 4])
    torch.testing.assert_close(batch[3:5], alone, rtol=1e-12, atol=1e-12)
    # accounting: the same teacher calls, each item at its own level; the callback reports the [B] levels
    assert teacher_b.calls == teacher_a.calls > 0
    for level_b, level_a in zip(levels_b, levels_a):
        assert level_b.shape == (8,) and len(set(level_b.tolist())) == 8
        torch.testing.assert_close(level_b[3:5], level_a, rtol=0, atol=0)
    assert len(levels_b) == len(levels_a) == 3


def test_one_int_seed_keeps_one_random_level_per_batch():
    """With one int seed all items share one level per guided step, drawn as before from Generator(seed)."""
    seen, teacher = [], Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(), SIGMAS, 0.6, 2, renoise_sigma="random",
                             renoise_seed=7, disable=True, callback=seen.append)
    g = torch.Generator().manual_seed(7)
    lo, hi = math.log(0.3), math.log(10.0)
    want = [math.exp(lo + torch.rand((), generator=g, dtype=torch.float64).item() * (hi - lo)) for _ in range(2)]
    assert [d["renoise_sigma"] for d in seen if "renoise_sigma" in d] == want
    assert teacher.sigmas == want  # float64 samples: the teacher gets float64 sigmas


# --- 2. reusing one DistillationDenoiser ------------------------------------------------------------

@pytest.mark.parametrize("solver", ["sample_heun", "sample_dpmpp_sde", "sample_euler_ancestral"])
@pytest.mark.parametrize("renoise_seed", [None, 5])
def test_a_reused_wrapper_starts_each_run_fresh(solver, renoise_seed):
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)

    def run(wrapped):
        torch.manual_seed(0)
        return getattr(ks, solver)(wrapped, x0(4), sigmas, disable=True)

    def make():
        return DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, 3, renoise_sigma="random",
                                    renoise_seed=renoise_seed)

    reused = make()
    first, second = run(reused), run(reused)
    assert torch.equal(first, second)
    assert torch.equal(second, run(make()))


def test_reset_starts_a_run_that_does_not_begin_at_sigma_0():
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    wrapped = DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, guided_steps=[1, 2], renoise_seed=3)
    first = ks.sample_euler(wrapped, x0(4), sigmas[1:], disable=True)
    wrapped.reset()
    second = ks.sample_euler(wrapped, x0(4), sigmas[1:], disable=True)
    without_reset = ks.sample_euler(wrapped, x0(4), sigmas[1:], disable=True)
    assert torch.equal(first, second) and not torch.equal(second, without_reset)


# --- 4. errors that name the option -----------------------------------------------------------------

@pytest.mark.parametrize("seed", [2**70, -2**63 - 1, [0, 2**64]])
def test_out_of_range_seeds_are_named(seed):
    x = x0(2)
    with pytest.raises(ValueError, match=r"renoise_seed(\[1\])? = -?\d+ is out of range .*valid: -9223372036854775808"):
        kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, renoise_seed=seed, disable=True)
    with pytest.raises(ValueError, match=r"seed(\[1\])? = -?\d+ is out of range"):
        seeded_noise_sampler(x, seed)
    seeded_noise_sampler(x, 2**64 - 1)(1.0, 0.5)  # the ends of the range are fine
    seeded_noise_sampler(x, -2**63)(1.0, 0.5)


@pytest.mark.parametrize("option, value, match", [
    ("lam", lambda i: 0.5, r"lam must be a callable f\(i, sigma_i\)"),
    ("lam", lambda i, s, t: 0.5, r"lam must be a callable f\(i, sigma_i\)"),
    ("renoise_sigma", lambda i, s: 1.0, r"renoise_sigma must be a callable f\(i, sigma_in, sigma_out\)"),
])
def test_callables_of_the_wrong_arity_are_named(option, value, match):
    kwargs = {"lam": 0.5, option: value}
    with pytest.raises(TypeError, match=match):
        kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, k=2, disable=True, **kwargs)
    kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, lambda i, s, *rest: 0.5, 2,
                             disable=True)  # a callable taking more optional arguments is fine


@pytest.mark.parametrize("bad, error, match", [
    (lambda s, t: torch.zeros(3, 3, dtype=torch.float64), ValueError, r"shape \(3, 3\), expected \(2, 3\)"),
    (lambda s, t: torch.zeros(2, 3, dtype=torch.int64), TypeError, "dtype torch.int64"),
    (lambda s, t: [0.0], TypeError, "returned list"),
])
@pytest.mark.parametrize("option", ["noise_sampler", "renoise_noise_sampler"])
def test_noise_samplers_with_a_wrong_output_are_named(bad, error, match, option):
    with pytest.raises(error, match=rf"{option}\(.*{match}"):
        kdpp.sample_euler_ancestral_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, 0.5, **{option: bad},
                                           disable=True)


def test_noise_in_another_float_dtype_is_cast_to_x_dtype():
    """float32 noise for a float64 x (ComfyUI's noise samplers do that) is accepted, as adding it to x would."""
    def run(dtype):
        return kdpp.sample_euler_ancestral_distpp(
            nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, 0.5, disable=True,
            noise_sampler=lambda s, t: torch.ones(2, 3, dtype=dtype), renoise_noise_sampler=lambda s, t: torch.ones(2, 3))
    assert run(torch.float32).dtype == torch.float64 and torch.equal(run(torch.float32), run(torch.float64))


@pytest.mark.parametrize("option", ["noise_sampler", "renoise_noise_sampler"])
def test_nan_from_a_noise_sampler_is_blamed_on_it(option):
    def nan_noise(sigma, sigma_next):
        return torch.full((2, 3), math.nan, dtype=torch.float64)

    with pytest.raises(FloatingPointError, match=rf"^{option}\(10, 5\) returned NaN"):
        kdpp.sample_lcm_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, 0.5, **{option: nan_noise},
                               disable=True)


def test_a_cfg_teacher_without_cond_says_teacher_extra_args():
    teacher = kdpp.CFGDenoiser(other_denoiser, 3.0)
    with pytest.raises(ValueError, match=r"without cond and uncond.*teacher_extra_args=\{'cond'"):
        kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(2), SIGMAS, 0.5, teacher_extra_args={}, disable=True)
    with pytest.raises(ValueError, match="without cond:"):
        kdpp.CFGDenoiser(other_denoiser, 1.0)(x0(2), torch.ones(2))
    with pytest.raises(ValueError, match="without cond and uncond"):
        kdpp.CFGDenoiser(other_denoiser, 0.5).guided_and_uncond(x0(2), torch.ones(2))


# --- 5. checked early --------------------------------------------------------------------------------

def test_renoise_seed_with_a_renoise_noise_sampler_is_refused():
    noise = seeded_noise_sampler(x0(2), 1)
    with pytest.raises(ValueError, match="renoise_seed and renoise_noise_sampler"):
        kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, 0.5, renoise_seed=0,
                                 renoise_noise_sampler=noise, disable=True)
    with pytest.raises(ValueError, match="renoise_seed and renoise_noise_sampler"):
        DistillationDenoiser(nonlinear_denoiser, other_denoiser, SIGMAS, 0.5, renoise_seed=0,
                             renoise_noise_sampler=noise)
    # with random levels the seed still seeds the levels: accepted
    kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, 0.5, renoise_seed=0,
                             renoise_sigma="random", renoise_noise_sampler=noise, disable=True)


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((None, SIGMAS, 0.5, 1), {}, TypeError, "teacher must be a callable"),
    ((other_denoiser, SIGMAS, 0.5, 1), {"guided_steps": [0]}, ValueError, "give k or guided_steps, not both"),
    ((other_denoiser, SIGMAS, [0.5, 0.5], 1), {}, ValueError, "lam has 2 entries"),
    ((other_denoiser, SIGMAS, 0.5), {"renoise_seed": 2**70}, ValueError, "renoise_seed = .* out of range"),
    ((other_denoiser, SIGMAS, 0.5), {"guided_steps": [9]}, ValueError, r"guided_steps\[0\] = 9 is out of range"),
])
def test_distillation_denoiser_validates_at_construction(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        DistillationDenoiser(nonlinear_denoiser, *args, **kwargs)


def test_per_step_lam_follows_guided_steps_as_given():
    """guided_steps=[2, 0] with lam=[0.1, 0.9]: 0.1 on step 2, 0.9 on step 0."""
    ref = kdpp.TeacherRefinement(other_denoiser, [0.1, 0.9], None, SIGMAS, x0(2), guided_steps=[2, 0])
    assert ref.lams == {2: [0.1], 0: [0.9]}
    a = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, [0.1, 0.9], guided_steps=[2, 0],
                                 renoise_seed=1, disable=True)
    b = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(2), SIGMAS, [0.9, 0.1], guided_steps=[0, 2],
                                 renoise_seed=1, disable=True)
    assert torch.equal(a, b)


# --- 6. what lam = 0 equals: Euler's churn noise ----------------------------------------------------

def test_euler_churn_noise_is_drawn_only_on_churned_steps():
    """k-diffusion 0.1.1's sample_euler draws churn noise on every step once s_churn > 0 (dropping it where
    s_tmin / s_tmax exclude the step); kdpp, like ComfyUI, draws only on churned steps. With s_tmax excluding
    step 0 only, kdpp equals k-diffusion after one extra draw, and differs without it (docs/faq.md)."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    options = {"s_churn": 1.0, "s_tmax": 6.0, "disable": True}
    torch.manual_seed(1)
    want = ks.sample_euler(nonlinear_denoiser, x0(4), sigmas, **options)
    torch.manual_seed(1)
    torch.randn(4, 3, dtype=torch.float64)  # the draw k-diffusion makes (and drops) on step 0
    got = kdpp.sample_euler_distpp(nonlinear_denoiser, None, x0(4), sigmas, 0.0, **options)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.manual_seed(1)
    assert not torch.allclose(kdpp.sample_euler_distpp(nonlinear_denoiser, None, x0(4), sigmas, 0.0, **options), want)
