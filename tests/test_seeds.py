"""The seeding and stepping policy of the core: one seed, four streams keyed by the absolute step (kdpp.noise),
per-item seeds, split schedules equal to the unsplit run, and a reused DistillationDenoiser."""
import math

import pytest
import torch

import kdpp
from kdpp.noise import StepStreams, initial_noise, seeded_noise_sampler, stream_seed
from kdpp.wrappers import DistillationDenoiser
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
SIGMAS = [10.0, 5.0, 2.0, 0.8, 0.3, 0.0]
STOCHASTIC = ["euler_ancestral", "dpmpp_2s_ancestral", "lcm"]


def x0(batch=8, seed=0):
    return torch.randn((batch, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


def step_noise(seed, stream, step, shape):
    """What kdpp.noise documents for a stream's draw at an absolute step (one int seed): float32, then the run's dtype."""
    g = torch.Generator().manual_seed(stream_seed(stream_seed(seed, stream), step))
    return torch.randn(shape, generator=g, dtype=torch.float32).double()


def test_solver_noise_is_the_documented_stream_of_each_step():
    """Euler ancestral at lam = 0 with seed s: k-diffusion's sampler fed step j's noise from stream 1."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    x = x0(2)
    draws = iter([step_noise(9, 1, j, x.shape) for j in range(len(SIGMAS) - 1)])
    want = ks.sample_euler_ancestral(nonlinear_denoiser, x, sigmas, disable=True, noise_sampler=lambda s, t: next(draws))
    got = kdpp.sample_euler_ancestral_distpp(nonlinear_denoiser, None, x, sigmas, 0.0, seed=9, disable=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_renoise_noise_and_random_levels_are_the_documented_streams():
    """The teacher sees D + tau xi with xi from stream 2 and tau from stream 3 of the guided step."""
    teacher, seen = Recorder(other_denoiser), []
    x = x0(2)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x, SIGMAS, 0.5, guided_steps=[1, 3], renoise_sigma="random",
                             seed=4, disable=True, callback=seen.append)
    lo, hi = math.log(0.3), math.log(10.0)
    for call, step in enumerate([1, 3]):
        u = torch.rand((), generator=torch.Generator().manual_seed(stream_seed(stream_seed(4, 3), step)),
                       dtype=torch.float64).item()
        tau = math.exp(lo + u * (hi - lo))
        assert teacher.sigmas[call] == pytest.approx(tau, rel=1e-15)
        want = seen[step]["student_denoised"] + tau * step_noise(4, 2, step, x.shape)
        torch.testing.assert_close(teacher.inputs[call], want, rtol=1e-12, atol=1e-12)


def test_initial_noise_is_the_seed_itself_on_the_cpu():
    """One seed: ComfyUI's prepare_noise (torch.manual_seed(seed), randn of the batch); per item: one generator each."""
    torch.testing.assert_close(initial_noise(5, (2, 3)), torch.randn(2, 3, generator=torch.manual_seed(5)), rtol=0, atol=0)
    per_item = initial_noise([5, 6], (2, 3))
    torch.testing.assert_close(per_item[1], torch.randn(3, generator=torch.Generator().manual_seed(6)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
@pytest.mark.parametrize("renoise, level", [("random", "auto"), ("random", "random"), ("deterministic", "auto"),
                                            ("guidance", None)])
def test_split_schedules_equal_the_unsplit_run(name, renoise, level):
    """Stages run with full_sigmas draw the full run's noise of each step and guide its first k steps."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    sampler = kdpp.SAMPLERS[name]
    options = dict(renoise=renoise, renoise_sigma=level, seed=11, disable=True)
    teacher = Recorder(other_denoiser)
    whole = sampler(nonlinear_denoiser, teacher, x0(), sigmas, 0.5, 3, **options)
    for split in (1, 2, 4):
        staged = Recorder(other_denoiser)
        x = sampler(nonlinear_denoiser, staged, x0(), sigmas[:split + 1], 0.5, 3, full_sigmas=sigmas, **options)
        x = sampler(nonlinear_denoiser, staged, x, sigmas[split:], 0.5, 3, full_sigmas=sigmas, **options)
        if name != "dpmpp_2m":  # 2M restarts its history at a stage boundary (first order there), as in any host
            torch.testing.assert_close(x, whole, rtol=1e-12, atol=1e-12, msg=f"split at {split}")
        assert staged.sigmas == teacher.sigmas  # the same teacher calls at the same levels
    assert teacher.calls >= 3


@pytest.mark.parametrize("split", [1, 2, 3])  # (a split before the last step changes nothing: 2M's step to 0 is first order)
def test_a_split_dpmpp_2m_run_is_k_diffusions_split_run(split):
    """2M restarts its history at a stage boundary as k-diffusion's sample_dpmpp_2m does (a first-order step there):
    at lam = 0 the two stages equal k-diffusion's two calls, and differ from the unsplit run."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    ours = kdpp.sample_dpmpp_2m_distpp(nonlinear_denoiser, None, x0(), sigmas[:split + 1], 0.0, 0, full_sigmas=sigmas,
                                       disable=True)
    ours = kdpp.sample_dpmpp_2m_distpp(nonlinear_denoiser, None, ours, sigmas[split:], 0.0, 0, full_sigmas=sigmas,
                                       disable=True)
    theirs = ks.sample_dpmpp_2m(nonlinear_denoiser, x0(), sigmas[:split + 1], disable=True)
    theirs = ks.sample_dpmpp_2m(nonlinear_denoiser, theirs, sigmas[split:], disable=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    unsplit = ks.sample_dpmpp_2m(nonlinear_denoiser, x0(), sigmas, disable=True)
    assert (ours - unsplit).abs().max() > 1e-6


def test_a_stage_counts_k_and_guided_steps_on_the_full_schedule():
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(2), sigmas[2:], 0.5, 3, full_sigmas=sigmas, disable=True)
    assert teacher.sigmas == [SIGMAS[3]]  # only step 2 of the first three falls in this stage
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(2), sigmas[1:4], 0.5, guided_steps=[-1, 2],
                             full_sigmas=sigmas, step_offset=1, disable=True)
    assert teacher.sigmas == [SIGMAS[3]]  # step -1 (4) is in no stage step here, step 2 is
    assert kdpp.refine.stage_guided_steps(sigmas[1:4], guided_steps=[-1, 2], full_sigmas=sigmas) == [2]


def test_a_stage_may_end_in_zero_early():
    """ComfyUI's KSamplerAdvanced ends a stage at 0 (end_at_step without leftover noise): still a stage of the run."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    stage = torch.tensor([5.0, 2.0, 0.0], dtype=torch.float64)
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(2), stage, 0.5, guided_steps=[2], full_sigmas=sigmas,
                             disable=True)
    assert teacher.sigmas == [2.0]  # absolute step 2 is this stage's step to 0: "auto" renoises at its own level


@pytest.mark.parametrize("stage, offset, match", [
    ([7.0, 2.0, 0.8], None, r"sigmas\[0\] = 7 is not a level of full_sigmas"),
    ([5.0, 0.8, 0.0], None, r"is not a slice of full_sigmas"),
    ([5.0, 2.0, 0.8], 2, r"full_sigmas\[1\], not full_sigmas\[2\]"),
    ([5.0, 2.0, 0.8], 4, r"step_offset=4 does not fit"),
])
def test_a_stage_that_is_not_a_slice_of_full_sigmas_is_refused(stage, offset, match):
    with pytest.raises(ValueError, match=match):
        kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(2), stage, 0.5, full_sigmas=SIGMAS,
                                 step_offset=offset, disable=True)


@pytest.mark.parametrize("sampler", [kdpp.sample_euler_distpp, kdpp.sample_dpmpp_2s_ancestral_distpp,
                                     kdpp.sample_lcm_distpp])
@pytest.mark.parametrize("renoise", ["random", "deterministic"])
def test_per_item_seeds_do_not_depend_on_the_batch(sampler, renoise):
    """Items 3-4 of a batch of 8 equal the same items run alone (per-item seeds: solver, renoise, levels)."""
    x = x0()
    seeds = list(range(100, 108))

    def run(items):
        teacher, seen = Recorder(other_denoiser), []
        out = sampler(nonlinear_denoiser, teacher, x[items], SIGMAS, 0.6, 3, renoise=renoise, renoise_sigma="random",
                      seed=[seeds[j] for j in items], disable=True, callback=seen.append)
        return out, teacher, [d["renoise_sigma"] for d in seen if "renoise_sigma" in d]

    batch, teacher_b, levels_b = run(list(range(8)))
    part, teacher_p, levels_p = run([3, 4])
    torch.testing.assert_close(part, batch[3:5], rtol=1e-12, atol=1e-12)
    assert teacher_b.calls == teacher_p.calls > 0
    for lb, lp in zip(levels_b, levels_p):  # the teacher got each item's own level
        assert lb.shape == (8,) and torch.equal(lp, lb[3:5])
    assert len({float(v) for v in levels_b[0]}) == 8  # items draw different levels


def test_one_int_seed_draws_one_random_level_per_step_for_the_batch():
    seen, teacher = [], Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(), SIGMAS, 0.6, 2, renoise_sigma="random",
                             seed=7, disable=True, callback=seen.append)
    levels = [d["renoise_sigma"] for d in seen if "renoise_sigma" in d]
    assert all(isinstance(v, float) for v in levels) and teacher.sigmas == levels and len(set(levels)) == 2


def test_without_a_seed_the_solver_noise_is_the_global_rng_and_renoise_is_derived_from_it():
    """k-diffusion's default noise at lam = 0; a guided run repeats after the same torch.manual_seed."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    torch.manual_seed(1)
    want = ks.sample_euler_ancestral(nonlinear_denoiser, x0(2), sigmas, disable=True)
    torch.manual_seed(1)
    got = kdpp.sample_euler_ancestral_distpp(nonlinear_denoiser, None, x0(2), sigmas, 0.0, disable=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    runs = []
    for _ in range(2):
        torch.manual_seed(1)
        runs.append(kdpp.sample_euler_ancestral_distpp(nonlinear_denoiser, other_denoiser, x0(2), sigmas, 0.5, 2,
                                                       disable=True))
    assert torch.equal(*runs) and not torch.allclose(runs[0], got)


def test_the_refinement_never_moves_the_solver_stream():
    """A seeded guided run draws the plain run's solver noise: guiding only the last LCM step changes only R(D) - D."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    plain = kdpp.sample_lcm_distpp(nonlinear_denoiser, None, x0(2), sigmas, 0.0, seed=3, disable=True)
    seen = []
    guided = kdpp.sample_lcm_distpp(nonlinear_denoiser, other_denoiser, x0(2), sigmas, 0.7, guided_steps=[1, 4], seed=3,
                                    disable=True, callback=seen.append)
    replay = kdpp.sample_lcm_distpp(nonlinear_denoiser, other_denoiser, x0(2), sigmas, 0.7, guided_steps=[1], seed=3,
                                    disable=True)
    last = seen[-1]
    torch.testing.assert_close(guided, replay + 0.7 * (last["teacher_denoised"] - last["student_denoised"]),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(plain, replay)


# --- DistillationDenoiser: any k-diffusion sampler ----------------------------------------------------

@pytest.mark.parametrize("solver", ["sample_heun", "sample_dpmpp_sde", "sample_euler_ancestral"])
@pytest.mark.parametrize("seed", [None, 5])
def test_a_reused_wrapper_starts_each_run_fresh(solver, seed):
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)

    def run(wrapped):
        torch.manual_seed(0)
        return getattr(ks, solver)(wrapped, x0(4), sigmas, disable=True)

    def make():
        return DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, 3, renoise_sigma="random", seed=seed)

    reused = make()
    first, second = run(reused), run(reused)
    assert torch.equal(first, second)
    assert torch.equal(second, run(make()))


def test_a_wrapper_run_split_into_stages_equals_the_unsplit_run():
    """The wrapper keys steps by its whole schedule: k-diffusion run on two slices draws and guides as one run."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    wrapped = DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, 3, seed=2)
    whole = ks.sample_heun(wrapped, x0(4), sigmas, disable=True)
    wrapped.reset()
    staged = ks.sample_heun(wrapped, ks.sample_heun(wrapped, x0(4), sigmas[:3], disable=True), sigmas[2:], disable=True)
    torch.testing.assert_close(staged, whole, rtol=1e-12, atol=1e-12)


def test_the_wrapper_equals_the_paper_form_where_they_coincide():
    """On a guided step to 0 the paper's Euler step and the wrapped Euler step are both R(D): same seed, same run."""
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    paper = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(4), sigmas, 0.5, guided_steps=[-1], seed=6,
                                     disable=True)
    wrapped = DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, guided_steps=[-1], seed=6)
    torch.testing.assert_close(ks.sample_euler(wrapped, x0(4), sigmas, disable=True), paper, rtol=1e-12, atol=1e-12)


def test_reset_starts_a_run_that_does_not_begin_at_sigma_0():
    sigmas = torch.tensor(SIGMAS, dtype=torch.float64)
    wrapped = DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, guided_steps=[1, 2])
    torch.manual_seed(3)
    first = ks.sample_euler(wrapped, x0(4), sigmas[1:], disable=True)
    wrapped.reset()
    torch.manual_seed(3)
    second = ks.sample_euler(wrapped, x0(4), sigmas[1:], disable=True)
    torch.manual_seed(3)
    without_reset = ks.sample_euler(wrapped, x0(4), sigmas[1:], disable=True)
    assert torch.equal(first, second) and not torch.equal(second, without_reset)


# --- seeds and noise samplers: errors that name the option -------------------------------------------

@pytest.mark.parametrize("seed", [2**70, -2**63 - 1, [0, 2**64]])
def test_out_of_range_seeds_are_named(seed):
    x = x0(2)
    with pytest.raises(ValueError, match=r"seed(\[1\])? = -?\d+ is out of range .*valid: -9223372036854775808"):
        kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, seed=seed, disable=True)
    with pytest.raises(ValueError, match=r"seed(\[1\])? = -?\d+ is out of range"):
        seeded_noise_sampler(x, seed)
    seeded_noise_sampler(x, 2**64 - 1)(1.0, 0.5)  # the ends of the range are fine
    seeded_noise_sampler(x, -2**63)(1.0, 0.5)


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


def test_a_renoise_noise_sampler_replaces_the_seeded_renoise_noise_only():
    """The seed still draws the solver noise and the random levels."""
    ones = lambda s, t: torch.ones(2, 3, dtype=torch.float64)  # noqa: E731
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(2), SIGMAS, 0.5, seed=0, renoise_sigma="random",
                             renoise_noise_sampler=ones, disable=True)
    again = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, again, x0(2), SIGMAS, 0.5, seed=0, renoise_sigma="random",
                             disable=True)
    assert teacher.sigmas == again.sigmas and not torch.equal(teacher.inputs[0], again.inputs[0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_every_dtype_draws_the_float32_runs_noise(dtype):
    """torch's generators draw other values in other dtypes; kdpp's streams draw in float32 and cast, so a half or
    double run's renoise and solver noise (and so its teacher inputs) are the float32 run's up to rounding."""
    like = torch.empty(2, 3, 7)
    for seed in (5, [5, 6]):
        streams = [StepStreams(seed, "renoise") for _ in range(2)]
        assert torch.equal(streams[0].noise(3, like.to(dtype)), streams[1].noise(3, like).to(dtype))
        samplers = [seeded_noise_sampler(like.to(dtype), seed), seeded_noise_sampler(like, seed)]
        assert torch.equal(samplers[0](1.0, 0.5), samplers[1](1.0, 0.5).to(dtype))
    teachers = {d: Recorder(other_denoiser) for d in (torch.float32, dtype)}
    for d, teacher in teachers.items():
        kdpp.sample_euler_ancestral_distpp(nonlinear_denoiser, teacher, x0(2).to(d), torch.tensor(SIGMAS), 0.5, 2,
                                           seed=4, disable=True)
    ours, ref = (torch.stack([x.float() for x in teachers[d].inputs]) for d in (dtype, torch.float32))
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1, torch.float64: 1e-5}[dtype]
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
