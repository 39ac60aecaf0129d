"""The teacher refinement: where the teacher is called, how often, at which sigma, with which noise."""
import math

import pytest
import torch

import kdpp
from kdpp import ancestral_step
from conftest import Recorder, nonlinear_denoiser, other_denoiser

SIGMAS = [10.0, 5.0, 2.0, 0.8, 0.3, 0.0]
ODE = [kdpp.sample_euler_distpp, kdpp.sample_dpmpp_2m_distpp]
ALL = [kdpp.sample_euler_distpp, kdpp.sample_euler_ancestral_distpp, kdpp.sample_dpmpp_2s_ancestral_distpp,
       kdpp.sample_dpmpp_2m_distpp, kdpp.sample_lcm_distpp]
ALL_IDS = [f.__name__ for f in ALL]


def x0(shape=(4, 3), seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


def expected_teacher_sigmas(sampler, steps, level):
    """The documented renoise levels of each solver on the guided ``steps``, in order (0: no call)."""
    taus = []
    for i in steps:
        s, s_next = SIGMAS[i], SIGMAS[i + 1]
        if sampler is kdpp.sample_dpmpp_2s_ancestral_distpp:
            down, _ = ancestral_step(s, s_next)
            if down > 0:
                mid = math.sqrt(s * down)
                taus += [mid if level == "next" else s, s_next if level == "next" else mid]
                continue
        taus.append(s_next if level == "next" else s)
    return [t for t in taus if t > 0]


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("k", [1, 2, 5, 9])
@pytest.mark.parametrize("level", ["next", "current"])
def test_teacher_sigma_and_call_count(sampler, k, level):
    teacher = Recorder(other_denoiser)
    sampler(nonlinear_denoiser, teacher, x0(), SIGMAS, 0.5, k, renoise_sigma=level, disable=True)
    want = expected_teacher_sigmas(sampler, range(min(k, len(SIGMAS) - 1)), level)
    assert teacher.sigmas == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("guided_steps, steps", [([0], [0]), ([2], [2]), ([-1], [4]), ([3, 1], [1, 3]),
                                                 ([-2, 0, 2], [0, 2, 3]), (range(5), range(5)), ([], [])],
                         ids=["0", "2", "-1", "3,1", "-2,0,2", "all", "none"])
@pytest.mark.parametrize("level", ["next", "current"])
def test_guided_steps_call_the_teacher_at_those_steps_only(sampler, guided_steps, steps, level):
    """guided_steps (issues 14, 11): the teacher is called on the listed steps (2S: both stages), at the
    documented renoise level of each, and nowhere else; the student is called as in the plain run."""
    teacher, student = Recorder(other_denoiser), Recorder(nonlinear_denoiser)
    sampler(student, teacher, x0(), SIGMAS, 0.5, guided_steps=guided_steps, renoise_sigma=level, disable=True)
    assert teacher.sigmas == pytest.approx(expected_teacher_sigmas(sampler, steps, level), rel=1e-12)
    plain = Recorder(nonlinear_denoiser)
    sampler(plain, None, x0(), SIGMAS, 0.0, disable=True)
    assert student.calls == plain.calls


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("lam, k", [(0.0, 3), (0.5, 0), ([0.0, 0.0], 2)])
def test_no_teacher_call_without_guidance(sampler, lam, k):
    teacher = Recorder(other_denoiser)
    sampler(nonlinear_denoiser, teacher, x0(), SIGMAS, lam, k, disable=True)
    assert teacher.calls == 0
    sampler(nonlinear_denoiser, None, x0(), SIGMAS, lam, k, disable=True)  # no teacher needed


def test_random_constant_and_callable_levels():
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(), SIGMAS, 0.5, 5, renoise_sigma="random",
                             seed=1, disable=True)
    assert teacher.calls == 5 and all(0.3 <= t <= 10.0 for t in teacher.sigmas)
    assert len(set(teacher.sigmas)) == 5
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(), SIGMAS, 0.5, 2, renoise_sigma=1.25, disable=True)
    assert teacher.sigmas == [1.25, 1.25]
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(), SIGMAS, 0.5, 2,
                             renoise_sigma=lambda i, s, s_next: 0.5 * (s + s_next), disable=True)
    assert teacher.sigmas == [7.5, 3.5]


def test_random_levels_are_log_uniform_over_the_schedule():
    ref = kdpp.TeacherRefinement(other_denoiser, 1.0, 1, SIGMAS, x0(), renoise_sigma="random", seed=0,
                                 check=kdpp._checks.OutputChecker(x0()))
    u = torch.tensor([math.log(ref._tau(0, 10.0, 5.0)) for _ in range(4000)])
    lo, hi = math.log(0.3), math.log(10.0)
    assert u.min() >= lo and u.max() <= hi
    assert abs(u.mean().item() - (lo + hi) / 2) < 0.05
    assert abs(u.var().item() - (hi - lo) ** 2 / 12) < 0.03


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
def test_guidance_form_with_teacher_equal_student_is_identity(sampler):
    """R = D + lam (S(x_i) - S(x_i)) = D exactly, for any lam: the plain run, bit for bit."""
    torch.manual_seed(0)
    plain = sampler(nonlinear_denoiser, None, x0(), SIGMAS, 0.0, disable=True)
    for lam in (0.3, 1.0, 2.5):
        teacher = Recorder(nonlinear_denoiser)
        torch.manual_seed(0)
        got = sampler(nonlinear_denoiser, teacher, x0(), SIGMAS, lam, 5, renoise="guidance", disable=True)
        assert teacher.calls > 0
        assert torch.equal(got, plain)


def test_guidance_form_feeds_the_teacher_the_students_input():
    student, teacher = Recorder(nonlinear_denoiser), Recorder(other_denoiser)
    kdpp.sample_dpmpp_2s_ancestral_distpp(student, teacher, x0(), SIGMAS, 0.5, 2, renoise="guidance", disable=True)
    assert teacher.sigmas == student.sigmas[: teacher.calls]
    for a, b in zip(teacher.inputs, student.inputs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ODE, ids=[f.__name__ for f in ODE])
def test_deterministic_current_is_the_guidance_form(sampler):
    a = sampler(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.7, 3, renoise="deterministic",
                renoise_sigma="current", disable=True)
    b = sampler(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.7, 3, renoise="guidance", disable=True)
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
def test_solver_noise_is_paired_across_lam(sampler):
    """The renoise noise has its own generator: the global stream is consumed as with lam = 0."""
    torch.manual_seed(7)
    sampler(nonlinear_denoiser, None, x0(), SIGMAS, 0.0, disable=True)
    after_plain = torch.randn(3)
    torch.manual_seed(7)
    sampler(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.5, 3, renoise_sigma="random", disable=True)
    assert torch.equal(torch.randn(3), after_plain)


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
def test_reruns_are_bit_identical(sampler):
    runs = []
    for _ in range(2):
        torch.manual_seed(11)
        runs.append(sampler(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.5, 2, disable=True))
    assert torch.equal(*runs)
    torch.manual_seed(11)
    reseeded = sampler(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.5, 2, seed=5, disable=True)
    assert not torch.equal(reseeded, runs[0])


def test_per_item_seeds_do_not_depend_on_the_batch():
    x = x0((4, 3))
    noise = kdpp.seeded_noise_sampler(x, [10, 11, 12, 13])(1.0, 0.5)
    alone = kdpp.seeded_noise_sampler(x[2:3], [12])(1.0, 0.5)
    assert torch.equal(noise[2:3], alone)
    full = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, 2, seed=[10, 11, 12, 13], disable=True)
    part = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x[2:3], SIGMAS, 0.5, 2, seed=[12], disable=True)
    torch.testing.assert_close(full[2:3], part, rtol=0, atol=1e-14)


def test_callback_reports_teacher_estimates_on_guided_steps():
    seen = []
    kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.5, 2, callback=seen.append, disable=True)
    assert [("teacher_denoised" in d) for d in seen] == [True, True, False, False, False]
    assert seen[0]["renoise_sigma"] == SIGMAS[1]
    d = seen[0]
    torch.testing.assert_close(d["denoised"], d["student_denoised"] + 0.5 * (d["teacher_denoised"] - d["student_denoised"]))
    seen = []
    kdpp.sample_euler_distpp(nonlinear_denoiser, [other_denoiser, other_denoiser], x0(), SIGMAS, [0.2, 0.3], 1,
                             callback=seen.append, disable=True)
    assert isinstance(seen[0]["teacher_denoised"], list) and len(seen[0]["teacher_denoised"]) == 2


def test_teacher_extra_args_default_to_extra_args_and_can_differ():
    got = {}

    def student(x, sigma, tag):
        return nonlinear_denoiser(x, sigma)

    def teacher(x, sigma, tag):
        got.setdefault("tags", []).append(tag)
        return other_denoiser(x, sigma)

    kdpp.sample_euler_distpp(student, teacher, x0(), SIGMAS, 0.5, 1, extra_args={"tag": "s"}, disable=True)
    kdpp.sample_euler_distpp(student, teacher, x0(), SIGMAS, 0.5, 1, extra_args={"tag": "s"},
                             teacher_extra_args={"tag": "t"}, disable=True)
    assert got["tags"] == ["s", "t"]


def test_numpy_integer_seeds_are_accepted():
    import numpy as np

    a = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.5, 2, seed=np.int64(4), disable=True)
    b = kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, 0.5, 2, seed=4, disable=True)
    assert torch.equal(a, b)


def test_teacher_refinement_is_usable_alone_without_a_checker():
    """The public class needs no private OutputChecker; it checks its teacher's outputs."""
    x = x0()
    ref = kdpp.TeacherRefinement(other_denoiser, 0.5, 1, SIGMAS, x, renoise="deterministic")
    D = nonlinear_denoiser(x, torch.full((4,), SIGMAS[0], dtype=torch.float64))
    out = ref.refine(0, D, D, x, SIGMAS[0], SIGMAS[1])
    point = D + SIGMAS[1] / SIGMAS[0] * (x - D)
    T = other_denoiser(point, torch.full((4,), SIGMAS[1], dtype=torch.float64))
    torch.testing.assert_close(out.denoised, D + 0.5 * (T - D), rtol=0, atol=1e-12)
    ref.raise_if_nonfinite()
    bad = kdpp.TeacherRefinement(lambda p, s: p * math.nan, 0.5, 1, SIGMAS, x, renoise="deterministic")
    bad.refine(0, D, D, x, SIGMAS[0], SIGMAS[1])
    with pytest.raises(FloatingPointError, match="teacher at step 0"):
        bad.raise_if_nonfinite()
