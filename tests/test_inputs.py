"""dtype, device and shape handling, and clear errors for bad input."""
import inspect
import math
import warnings

import pytest
import torch

import kdpp
from conftest import nonlinear_denoiser, other_denoiser
from kdpp.wrappers import DistillationDenoiser

SIGMAS = torch.tensor([8.0, 3.0, 1.0, 0.3, 0.0])
ALL = [kdpp.sample_euler_distpp, kdpp.sample_euler_ancestral_distpp, kdpp.sample_dpmpp_2s_ancestral_distpp,
       kdpp.sample_dpmpp_2m_distpp, kdpp.sample_lcm_distpp]
ALL_IDS = [f.__name__ for f in ALL]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def ones_noise(sampler, x):
    """A fixed solver noise (all ones) for the samplers that draw any, so runs compare across dtypes."""
    return {"noise_sampler": lambda s, t: torch.ones_like(x)} if sampler is not kdpp.sample_dpmpp_2m_distpp else {}


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_dtype_and_device_preserved_with_float32_cpu_sigmas(sampler, dtype, device):
    x = (torch.randn(2, 4, 6, 6) * 8).to(device=device, dtype=dtype)
    out = sampler(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, 2, disable=True)
    assert out.dtype == dtype and out.device == x.device and out.shape == x.shape
    assert bool(torch.isfinite(out).all())
    ref = sampler(nonlinear_denoiser, other_denoiser, x.double(), SIGMAS, 0.5, 2, renoise="deterministic",
                  disable=True, **ones_noise(sampler, x.double()))
    low = sampler(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, 2, renoise="deterministic",
                  disable=True, **ones_noise(sampler, x))
    tol = {torch.float16: 3e-2, torch.bfloat16: 2e-1, torch.float32: 1e-4, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(low.double(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("shape", [(3, 5), (3, 2, 4), (2, 4, 8, 8), (1, 4, 3, 8, 8)], ids=["2d", "3d", "4d", "5d-video"])
def test_any_rank_and_batch_items_are_independent(sampler, shape):
    x = torch.randn(shape, dtype=torch.float64) * 8
    full = sampler(nonlinear_denoiser, other_denoiser, x, SIGMAS, 0.5, 2, renoise="deterministic",
                   disable=True, **ones_noise(sampler, x))
    assert full.shape == x.shape
    one = sampler(nonlinear_denoiser, other_denoiser, x[-1:], SIGMAS, 0.5, 2, renoise="deterministic",
                  disable=True, **ones_noise(sampler, x[-1:]))
    torch.testing.assert_close(full[-1:], one, rtol=0, atol=1e-13)


def run(**overrides):
    args = dict(student=nonlinear_denoiser, teacher=other_denoiser, x=torch.randn(2, 3) * 8, sigmas=SIGMAS, lam=0.5, k=1)
    args.update(overrides)
    return kdpp.sample_euler_distpp(args.pop("student"), args.pop("teacher"), args.pop("x"), args.pop("sigmas"),
                                    args.pop("lam"), args.pop("k"), disable=True, **args)


@pytest.mark.parametrize("overrides, error, match", [
    ({"sigmas": SIGMAS[None]}, ValueError, "sigmas must be 1-D"),
    ({"sigmas": torch.tensor([])}, ValueError, r"sigmas must have at least 2 entries"),
    ({"sigmas": [1.0]}, ValueError, r"sigmas must have at least 2 entries \(a schedule of N steps has N \+ 1 levels\)"),
    ({"sigmas": [0.0, 1.0, 8.0]}, ValueError, r"sigmas must be strictly decreasing \(it is increasing: pass it reversed"),
    ({"sigmas": [8.0, 1.0, 1.0, 0.0]}, ValueError, r"sigmas must be strictly decreasing, got"),
    ({"full_sigmas": [8.0, 3.0]}, ValueError, r"full_sigmas\b"),
    ({"step_offset": 1.5}, TypeError, r"step_offset must be an int"),
    ({"sigmas": torch.tensor([1.0, 3.0, 0.0])}, ValueError, "sigmas must be strictly decreasing"),
    ({"sigmas": torch.tensor([3.0, 3.0, 0.0])}, ValueError, "sigmas must be strictly decreasing"),
    ({"sigmas": torch.tensor([3.0, 0.0, -1.0])}, ValueError, "sigmas must be positive except the last"),
    ({"sigmas": torch.tensor([math.nan, 1.0, 0.0])}, ValueError, "sigmas must be finite"),
    ({"sigmas": torch.tensor([math.inf, 1.0, 0.0])}, ValueError, "sigmas must be finite"),
    ({"x": torch.tensor([[1.0, math.nan]])}, ValueError, "x contains NaN or inf"),
    ({"x": torch.tensor([[1.0, math.inf]])}, ValueError, "x contains NaN or inf"),
    ({"x": torch.ones(2, 3, dtype=torch.long)}, TypeError, "x must be a floating-point tensor"),
    ({"x": [[1.0, 2.0]]}, TypeError, "x must be a torch.Tensor"),
    ({"k": -1}, ValueError, "k must be a non-negative int"),
    ({"k": 1.5}, TypeError, "k must be a non-negative int"),
    ({"k": True}, TypeError, "k must be a non-negative int"),
    ({"lam": math.nan}, ValueError, "lam must be finite"),
    ({"lam": math.inf}, ValueError, "lam must be finite"),
    ({"lam": "0.5"}, TypeError, "lam must be a float"),
    ({"lam": [0.5, 0.5], "k": 1}, ValueError, "lam has 2 entries.*min\\(k, number of steps\\) = 1"),
    ({"lam": [0.5, math.nan], "k": 2}, ValueError, "lam\\[1\\] must be finite"),
    ({"lam": lambda i, s: math.inf}, ValueError, "lam\\(0, 8\\) must be finite"),
    ({"teacher": [other_denoiser, other_denoiser], "lam": 0.5}, ValueError, "with 2 teachers, lam must be a list of 2"),
    ({"teacher": None}, TypeError, "teacher is None, but lam is not 0"),
    ({"student": None}, TypeError, "student must be a callable"),
    ({"renoise": "fresh"}, ValueError, "renoise must be one of"),
    ({"renoise_sigma": "previous"}, ValueError, "renoise_sigma must be one of"),
    ({"renoise_sigma": -1.0}, ValueError, "renoise_sigma must be >= 0"),
    ({"renoise": "guidance", "renoise_sigma": "next"}, ValueError, "renoise='guidance' evaluates the teacher at the current"),
    ({"renoise_sigma": lambda i, s, t: -2.0}, ValueError, "renoise_sigma\\(0, ...\\) must be >= 0"),
    ({"teacher_extra_args": [{}, {}]}, ValueError, "teacher_extra_args must be a dict or one dict per teacher"),
    ({"seed": [1, 2, 3]}, ValueError, "seed has 3 entries, expected one per batch item \\(2\\)"),
])
def test_bad_input_names_the_argument(overrides, error, match):
    with pytest.raises(error, match=match):
        run(**overrides)


# every option a user passes is named when it is wrong
OPTION_CASES = [
    ({"eta": math.nan}, ValueError, "eta must be finite"),
    ({"eta": -0.5}, ValueError, "eta must be >= 0"),
    ({"eta": "1"}, TypeError, "eta must be a real number"),
    ({"s_noise": math.nan}, ValueError, "s_noise must be finite"),
    ({"s_noise": math.inf}, ValueError, "s_noise must be finite"),
    ({"s_churn": math.nan}, ValueError, "s_churn must be finite"),
    ({"s_churn": -1.0}, ValueError, "s_churn must be >= 0"),
    ({"s_tmin": math.nan}, ValueError, "s_tmin must be a number"),
    ({"s_tmax": math.nan}, ValueError, "s_tmax must be a number"),
    ({"noise_sampler": 3}, TypeError, "noise_sampler must be a callable or None"),
    ({"renoise_noise_sampler": "x"}, TypeError, "renoise_noise_sampler must be a callable or None"),
    ({"seed": "abc"}, TypeError, "seed must be an int or one int per batch item"),
    ({"seed": 1.5}, TypeError, "seed must be an int or one int per batch item"),
    ({"seed": [1, 2, 3]}, ValueError, r"seed has 3 entries, expected one per batch item \(8\)"),
    ({"seed": [1, "a"] * 4}, TypeError, r"seed\[1\] must be an int"),
    ({"extra_args": [1, 2]}, TypeError, "extra_args must be a dict of keyword arguments, got list"),
    ({"teacher_extra_args": "t"}, ValueError, "teacher_extra_args must be a dict or one dict per teacher"),
    ({"callback": "print"}, TypeError, "callback must be a callable or None"),
    ({"disable": "yes"}, TypeError, "disable must be True, False or None"),
    ({"history": "old"}, ValueError, "history must be 'student' or 'refined'"),
    ({"cfg_pp": "yes"}, TypeError, "cfg_pp must be True or False"),
    ({"guided_steps": [1, 1]}, ValueError, r"guided_steps must not repeat a step"),
    ({"guided_steps": [0, -4]}, ValueError, r"guided_steps must not repeat a step"),
    ({"guided_steps": [4]}, ValueError, r"guided_steps\[0\] = 4 is out of range for a schedule of 4 steps"),
    ({"guided_steps": [0, -5]}, ValueError, r"guided_steps\[1\] = -5 is out of range"),
    ({"guided_steps": [0.5]}, TypeError, r"guided_steps\[0\] must be an int"),
    ({"guided_steps": [True]}, TypeError, r"guided_steps\[0\] must be an int"),
    ({"guided_steps": "01"}, TypeError, "guided_steps must be a sequence of step indices"),
    ({"guided_steps": 2}, TypeError, "guided_steps must be a sequence of step indices"),
    ({"guided_steps": [0], "k": 1}, ValueError, "give k or guided_steps, not both"),
    ({"guided_steps": [0, 2], "lam": [0.5]}, ValueError, r"lam has 1 entries.*len\(guided_steps\) = 2"),
]
OPTION_RUNS = [pytest.param(name, *case, id=f"{name}-" + ",".join(f"{k}={v!r}" for k, v in case[0].items()))
               for name, sampler in kdpp.SAMPLERS.items() for case in OPTION_CASES
               if set(case[0]) <= set(inspect.signature(sampler).parameters)]


@pytest.mark.parametrize("name, overrides, error, match", OPTION_RUNS)
def test_every_option_is_validated_by_name(name, overrides, error, match):
    """Each sampler that takes the option refuses a bad value, naming it."""
    sampler = kdpp.SAMPLERS[name]
    args = {"lam": 0.5, "k": None, "disable": True, **overrides}
    student = kdpp.CFGDenoiser(nonlinear_denoiser, 0.5) if getattr(sampler, "cfg_pp", False) else nonlinear_denoiser
    with pytest.raises(error, match=match):
        sampler(student, other_denoiser, torch.randn(8, 3) * 8, SIGMAS, args.pop("lam"), args.pop("k"), **args)


@pytest.mark.parametrize("who, bad, error, match", [
    ("student", lambda x, s: x[:, :2], ValueError, r"student at step 0 \(sigma=8\) returned shape \(2, 2\), expected \(2, 3\)"),
    ("teacher", lambda x, s: x.half(), TypeError,
     r"teacher at step 0 \(renoise level tau=3\) returned dtype torch.float16, expected torch.float32 \(the dtype of x\) or a wider"),
    ("student", lambda x, s: x.long(), TypeError, r"student at step 0 \(sigma=8\) returned dtype torch.int64"),
    ("teacher", lambda x, s: x.to(torch.complex64), TypeError, r"teacher at step 0 \(renoise level tau=3\) returned dtype torch.complex64"),
    ("teacher", lambda x, s: x.numpy(), TypeError, r"teacher at step 0 \(renoise level tau=3\) returned ndarray"),
])
def test_bad_model_output_is_named(who, bad, error, match):
    with pytest.raises(error, match=match):
        run(**{who: bad})


@pytest.mark.parametrize("sampler", ALL, ids=ALL_IDS)
@pytest.mark.parametrize("who", ["student", "teacher"])
def test_non_finite_model_output_names_model_and_step(sampler, who):
    def nan_at_step_1(x, sigma):
        out = nonlinear_denoiser(x, sigma)
        return out * math.nan if 1.0 - 1e-6 <= float(sigma[0]) <= 3.0 + 1e-6 else out

    models = {"student": nonlinear_denoiser, "teacher": other_denoiser}
    models[who] = nan_at_step_1
    # with eta = 1 the 2S midpoint of step 0 is sqrt(s_0 * s_down) = s_1: that call fails first
    step = 0 if sampler is kdpp.sample_dpmpp_2s_ancestral_distpp else 1
    level = "sigma" if who == "student" else "renoise level tau"
    with pytest.raises(FloatingPointError, match=rf"{who} at step {step} \({level}=3\) returned NaN or inf"):
        sampler(models["student"], models["teacher"], torch.randn(2, 3) * 8, SIGMAS, 0.5, 4,
                renoise_sigma="current", disable=True)


def test_a_denoiser_with_the_wrong_signature_is_named_before_sampling():
    """The student or teacher that cannot take its keyword arguments is named with their source and the fix."""
    calls = []

    def teacher(x, sigma):
        calls.append(sigma)
        return x

    extra = {"cond": torch.zeros(2, 3)}
    student = lambda x, sigma, cond: nonlinear_denoiser(x, sigma)  # noqa: E731
    with pytest.raises(TypeError, match=r"the teacher cannot be called as teacher\(x, sigma, \*\*extra_args "
                                        r"\(teacher_extra_args defaults to it\)\) with .* keys 'cond'.*"
                                        r"pass the teacher's own keyword arguments as teacher_extra_args"):
        run(student=student, teacher=teacher, extra_args=extra)
    with pytest.raises(TypeError, match=r"the student cannot be called as student\(x, sigma, \*\*extra_args\) "
                                        r"with extra_args keys 'cond'"):
        run(student=lambda x, sigma: x, extra_args=extra)
    with pytest.raises(TypeError, match=r"teacher\[1\] cannot be called .*teacher_extra_args\[1\]"):
        run(teacher=[other_denoiser, teacher], lam=[0.5, 0.5], teacher_extra_args=[{}, {"c": 1}])
    assert not calls
    run(student=student, teacher=teacher, extra_args=extra, teacher_extra_args={})  # the fix works


@pytest.mark.parametrize("lam", [50.0, -0.5, [0.3, 7.0]])
def test_lam_far_outside_the_interpolation_range_warns(lam):
    placement = {"guided_steps": [0, 1]} if isinstance(lam, list) else {}
    with pytest.warns(kdpp.KdppWarning, match=r"lam(\[1\])?=-?[\d.]+ is outside 0 .. 2: lam interpolates .* typically 0.05 .. 1"):
        run(lam=lam, k=None, **placement)


def test_kdpp_warnings_can_be_silenced_by_their_category():
    """kdpp.KdppWarning is public: filtering it silences kdpp's warnings and nothing else."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=kdpp.KdppWarning)
        run(lam=50.0, k=None)
        with pytest.raises(UserWarning, match="not kdpp's"):
            warnings.warn("not kdpp's", UserWarning)


def test_cfg_pp_needs_a_guided_student():
    with pytest.raises(TypeError, match="cfg_pp=True needs a student with guided_and_uncond"):
        kdpp.sample_euler_cfg_pp_distpp(nonlinear_denoiser, None, torch.randn(2, 3), SIGMAS, 0.0, disable=True)


def test_import_kdpp_does_not_import_heavy_stacks(fresh_python):
    code = "import sys, kdpp, kdpp.toy; print(sorted(m for m in ('k_diffusion', 'torchvision', 'diffusers', 'wandb', 'clip', 'matplotlib') if m in sys.modules))"
    run = fresh_python(["-c", code])
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


NOT_NUMBERS = ["karras", ["14.6", "0"], {"a": 1}]


@pytest.mark.parametrize("name, sigmas", [("sigmas", v) for v in [*NOT_NUMBERS, None]]
                         + [("full_sigmas", v) for v in NOT_NUMBERS])  # full_sigmas=None: the default, sigmas
def test_a_schedule_that_is_not_numbers_is_refused_by_name(name, sigmas):
    args = {"sigmas": sigmas} if name == "sigmas" else {"sigmas": SIGMAS, "full_sigmas": sigmas}
    with pytest.raises(TypeError, match=rf"^{name} must be a 1-D tensor or a sequence of numbers"):
        kdpp.sample_euler_distpp(nonlinear_denoiser, other_denoiser, torch.randn(2, 3), lam=0.5, k=1, disable=True,
                                 **args)
    with pytest.raises(TypeError, match=r"^sigmas must be a 1-D tensor or a sequence of numbers"):
        DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, 1)


def test_schedule_builders_refuse_what_gives_no_schedule():
    from kdpp.schedules import karras_sigmas, timestep_sigmas

    with pytest.raises(ValueError, match=r"0 < sigma_min < sigma_max, got sigma_min=14.6, sigma_max=0.03"):
        karras_sigmas(4, 14.6, 0.03)  # swapped: would give a schedule that is not decreasing
    with pytest.raises(ValueError, match=r"^n \(the number of steps\) must be an int >= 1, got 0"):
        karras_sigmas(0, 0.03, 14.6)
    with pytest.raises(ValueError, match=r"^timesteps must be ints in 0 \.\. 999"):
        timestep_sigmas([1000, 500])
    assert torch.equal(timestep_sigmas(torch.tensor([999, 499])), timestep_sigmas([999, 499]))


def test_the_wrapper_names_a_student_it_cannot_call_and_takes_a_float_sigma():
    sigmas = torch.tensor([8.0, 3.0, 0.0])
    wrapped = DistillationDenoiser(lambda x: x, other_denoiser, sigmas, 0.5, 1)
    with pytest.raises(TypeError, match=r"^the student cannot be called as student\(x, sigma, \*\*extra_args\) "
                                        r"with no keyword arguments"):
        wrapped(torch.randn(2, 3), sigmas[0])
    x = torch.randn(2, 3)
    runs = [DistillationDenoiser(nonlinear_denoiser, other_denoiser, sigmas, 0.5, 1, seed=3)(x, sigma)
            for sigma in (8.0, sigmas[0])]
    assert torch.equal(*runs)


def test_a_missing_teacher_on_a_guided_run_names_the_fix():
    with pytest.raises(TypeError, match=r"^teacher is None, but lam is not 0 on a guided step: .* lam=0 \(or k=0\)"):
        kdpp.sample_euler_distpp(nonlinear_denoiser, None, torch.randn(2, 3), SIGMAS, 0.5, 1, disable=True)
    kdpp.sample_euler_distpp(nonlinear_denoiser, None, torch.randn(2, 3), SIGMAS, 0.0, 1, disable=True)  # plain
