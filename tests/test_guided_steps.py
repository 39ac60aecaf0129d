"""Which steps are guided: k or guided_steps, per-step lam, and the levels that do (not) call the teacher."""
import warnings

import pytest
import torch

import kdpp
from kdpp.hosts import bind
from kdpp.wrappers import DistillationDenoiser
from conftest import Recorder, nonlinear_denoiser, other_denoiser

ks = pytest.importorskip("k_diffusion.sampling", reason="k-diffusion is the oracle (pip install '.[test]')")
SIGMAS = [10.0, 5.0, 2.0, 0.8, 0.3, 0.0]


def x0(shape=(4, 3), seed=0):
    return torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * SIGMAS[0]


def student_for(name):
    """The student of a sampler form: a CFGDenoiser for the CFG++ forms."""
    if getattr(kdpp.SAMPLERS[name], "cfg_pp", False):
        c, u = torch.ones(4, 1, dtype=torch.float64), -torch.ones(4, 1, dtype=torch.float64)
        model = kdpp.CFGDenoiser(lambda x, s, c: nonlinear_denoiser(x, s) + 0.1 * c, 0.6)
        return model, {"cond": {"c": c}, "uncond": {"c": u}}
    return nonlinear_denoiser, {}


def guided_run(name, **placement):
    student, extra = student_for(name)
    torch.manual_seed(3)
    return kdpp.SAMPLERS[name](student, other_denoiser, x0(), SIGMAS, 0.4, extra_args=extra, teacher_extra_args={},
                               seed=5, disable=True, **placement)


@pytest.mark.parametrize("name", list(kdpp.SAMPLERS))
@pytest.mark.parametrize("k", [0, 1, 2, 5])
def test_guided_steps_range_k_is_k_bitwise(name, k):
    assert torch.equal(guided_run(name, guided_steps=range(k)), guided_run(name, k=k))
    if k == 1:
        assert torch.equal(guided_run(name), guided_run(name, k=1))  # k=None: 1


@pytest.mark.parametrize("name", list(kdpp.SAMPLERS))
def test_guided_steps_equal_a_per_step_lam_with_zeros(name):
    """Guiding steps 1 and 4 is lam = [0, 0.4, 0, 0, 0.4] on the first 5 (same renoise stream per call)."""
    a = guided_run(name, guided_steps=[4, 1], renoise="deterministic")
    student, extra = student_for(name)
    torch.manual_seed(3)
    b = kdpp.SAMPLERS[name](student, other_denoiser, x0(), SIGMAS, [0.0, 0.4, 0.0, 0.0, 0.4], 5, extra_args=extra,
                            teacher_extra_args={}, renoise="deterministic", seed=5, disable=True)
    assert torch.equal(a, b)


def test_per_step_lam_pairs_with_the_guided_steps_and_callable_lam_sees_each_one():
    """lam[j] weights guided_steps[j], as given ([3, 0] with [0.2, 0.7] puts 0.7 on step 0), or the j-th of the
    first k steps; lam_i = 0 skips step i; a callable lam is evaluated at each guided step with its sigma."""
    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x0(), SIGMAS, [0.5, 0.0, 0.2], 3, disable=True)
    assert teacher.sigmas == [SIGMAS[1], SIGMAS[3]]
    seen = []
    kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(), SIGMAS, [0.2, 0.7], guided_steps=[3, 0],
                             callback=seen.append, disable=True)
    guided = [d for d in seen if "teacher_denoised" in d]
    assert [d["i"] for d in guided] == [0, 3]
    for d, lam in zip(guided, [0.7, 0.2]):
        want = d["student_denoised"] + lam * (d["teacher_denoised"] - d["student_denoised"])
        torch.testing.assert_close(d["denoised"], want, rtol=0, atol=1e-12)
    calls = []
    kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(), SIGMAS,
                             lambda i, sigma: calls.append((i, sigma)) or 0.5, guided_steps=[-1, 2], disable=True)
    assert sorted(calls) == [(2, SIGMAS[2]), (4, SIGMAS[4])]
    calls.clear()
    kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x0(), SIGMAS,
                             lambda i, sigma: calls.append((i, sigma)) or 0.5, 2, disable=True)
    assert calls == [(0, SIGMAS[0]), (1, SIGMAS[1])]


def test_distillation_denoiser_guides_the_listed_steps():
    """Heun under the wrapper: step 2's evaluations (its own, and step 1's corrector at sigmas[2]) are guided."""
    teacher = Recorder(other_denoiser)
    wrapped = DistillationDenoiser(nonlinear_denoiser, teacher, SIGMAS, 0.5, guided_steps=[2])
    ks.sample_heun(wrapped, x0(), torch.tensor(SIGMAS, dtype=torch.float64), disable=True)
    assert teacher.sigmas == [SIGMAS[3], SIGMAS[3]]


def test_teacher_refinement_with_guided_steps():
    ref = kdpp.TeacherRefinement(other_denoiser, [0.3, 0.6], None, SIGMAS, x0(), guided_steps=[-1, 1])
    assert sorted(ref.lams) == [1, 4] and ref.lams[4] == [0.3] and ref.lams[1] == [0.6]
    x = x0()
    assert ref.refine(0, x, x, x, SIGMAS[0], SIGMAS[1]).teacher_denoised == []
    assert ref.refine(1, x, x, x, SIGMAS[1], SIGMAS[2]).renoise_sigma == SIGMAS[2]


def test_hosts_pass_guided_steps_and_a_call_time_placement_replaces_the_bound_one():
    teacher = Recorder(other_denoiser)
    fn = bind(kdpp.sample_euler_distpp, teacher, 0.5, guided_steps=[-2])
    fn(nonlinear_denoiser, x0(), SIGMAS, disable=True)
    assert teacher.sigmas == [SIGMAS[4]]
    fn(nonlinear_denoiser, x0(), SIGMAS, disable=True, k=2)
    fn(nonlinear_denoiser, x0(), SIGMAS, disable=True, guided_steps=[0])
    assert teacher.sigmas == [SIGMAS[4], SIGMAS[1], SIGMAS[2], SIGMAS[1]]


@pytest.mark.parametrize("options", [
    {"sigmas": [14.6, 0.0]},                                          # a one-step student
    {"k": 3},                                                         # k = number of steps
    {"guided_steps": [-1]},                                           # the last step
])
def test_auto_level_calls_the_teacher_on_a_guided_step_to_zero(options):
    """The default level renoises a guided step to sigma 0 at the step's own level: one teacher call there."""
    options = dict(options)
    sigmas = torch.tensor(options.pop("sigmas", [14.6, 3.0, 0.7, 0.0]), dtype=torch.float64)
    teacher = Recorder(other_denoiser)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x, sigmas, 0.5, disable=True, **options)
    guided = list(range(options.get("k", 1))) if "guided_steps" not in options else [len(sigmas) - 2]
    levels = [float(sigmas[i + 1]) if sigmas[i + 1] > 0 else float(sigmas[i]) for i in guided]
    assert teacher.sigmas == levels


@pytest.mark.parametrize("options", [
    {"sigmas": [14.6, 0.0]},                                          # a one-step student
    {"k": 3},                                                         # k = number of steps
    {"guided_steps": [-1]},                                           # the last step
    {"guided_steps": [0], "renoise_sigma": 0.0},                      # a constant level 0
])
def test_guided_step_that_cannot_call_the_teacher_warns(options):
    """A guided step whose renoise level is 0 calls no teacher (R is the identity there): say so, naming the fix."""
    options = {"renoise_sigma": "next", **options}
    sigmas = torch.tensor(options.pop("sigmas", [14.6, 3.0, 0.7, 0.0]), dtype=torch.float64)
    teacher = Recorder(other_denoiser)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    with pytest.warns(kdpp.KdppWarning, match=r"call no teacher.*renoise_sigma='auto' guides them"):
        kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, x, sigmas, 0.5, disable=True, **options)
    assert teacher.calls == (2 if options.get("k") == 3 else 0)  # k = 3: steps 0 and 1 still call it


@pytest.mark.parametrize("options", [
    {"sigmas": [14.6, 0.0], "renoise": "guidance"},
    {"sigmas": [14.6, 0.0], "renoise_sigma": "current"},
    {"k": 3, "lam": 0.0, "renoise_sigma": "next"},
    {"guided_steps": [-1], "lam": [0.0], "renoise_sigma": "next"},
    {"sigmas": [14.6, 3.0, 0.7], "renoise_sigma": "next"},           # a stage that stops above 0
])
def test_guided_steps_that_call_the_teacher_do_not_warn(options):
    options = dict(options)
    sigmas = torch.tensor(options.pop("sigmas", [14.6, 3.0, 0.7, 0.0]), dtype=torch.float64)
    lam = options.pop("lam", 0.5)
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 14.6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, x, sigmas, lam, disable=True, **options)


def test_the_warning_points_at_the_callers_line():
    x = torch.randn(1, 2, dtype=torch.float64) * 14.6
    with pytest.warns(UserWarning, match="call no teacher") as record:
        kdpp.sample_lcm_distpp(nonlinear_denoiser, other_denoiser, x, torch.tensor([14.6, 0.0]), 0.5,
                               renoise_sigma="next", disable=True)
    assert record[0].filename == __file__


@pytest.mark.parametrize("lam, k, guided_steps", [
    (0.5, None, None), (0.0, None, None), (0.5, 0, None), (0.5, 2, None), (0.5, None, []), (0.5, None, [-1]),
    ([0.0, 0.0], 2, None), ([0.0, 0.3], 2, None), (lambda i, s: 0.0, 1, None), (lambda i, s: 0.4, 1, None),
])
def test_calls_teacher_predicts_whether_a_run_calls_the_teacher(lam, k, guided_steps):
    """kdpp.refine.calls_teacher is the rule hosts use to skip a teacher: a run it says calls none calls none; a run it
    says may call one does unless a callable lam is 0 there."""
    from kdpp.refine import calls_teacher

    teacher = Recorder(other_denoiser)
    kdpp.sample_euler_distpp(nonlinear_denoiser, teacher, torch.randn(2, 3), SIGMAS, lam, k, guided_steps=guided_steps,
                             disable=True)
    predicted = calls_teacher(lam, k, guided_steps)
    assert predicted == (teacher.calls > 0) or (predicted and callable(lam))
