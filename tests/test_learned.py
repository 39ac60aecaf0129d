"""kdpp.learned: the shipped digits nets, the metrics, the benchmark's smoke run and the placement option."""
import copy
import importlib.util
import math
import pathlib

import pytest
import torch

pytest.importorskip("sklearn")

import kdpp  # noqa: E402
from kdpp.learned import (NULL_CLASS, STUDENTS, WEIGHTS, CountedNet, DigitsMetrics,  # noqa: E402
                          TeacherODEStudent, class_accuracy, conditioning, frechet_distance, guided_teacher,
                          load_digits, load_nets, provenance, sample_student, sample_teacher)
from kdpp.schedules import timestep_sigmas, trailing_timesteps  # noqa: E402

ROOT = pathlib.Path(__file__).parents[1]


@pytest.fixture(scope="module")
def nets():
    return load_nets()


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_weights_are_small_fp16_with_provenance():
    blobs = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    assert set(blobs) == {"teacher", "classifier", *STUDENTS}
    assert all(v.dtype == torch.float16 for blob in blobs.values() for v in blob["state_dict"].values())
    assert WEIGHTS.stat().st_size < 8e6
    prov = provenance()
    for key in ("script", "seed", "git_revision", "torch", "threads", "seconds", "teacher_40step_accuracy",
                "classifier_test_accuracy", "stopping_rule", "students", "fd_by_steps"):
        assert key in prov, key
    assert prov["script"] == "benchmarks/train_learned.py"
    assert "--overwrite" in prov["command"] and prov["args"]["out"] == "kdpp/learned/digits_nets.pt"
    for name in STUDENTS:  # every student stopped by the plateau rule, not the iteration cap
        assert prov["students"][name]["stopped_by"] == "plateau", name


def test_classifier_recognises_held_out_digits(nets):
    x, y = load_digits()
    from kdpp.learned import split

    _, test = split(len(x), seed=provenance()["seed"])
    acc = class_accuracy(nets["classifier"], x[test], y[test])
    assert acc == pytest.approx(provenance()["classifier_test_accuracy"], abs=2e-3)  # fp16 rounding only
    assert acc > 0.95


def test_forty_step_teacher_is_recognised_at_its_documented_accuracy(nets):
    documented = provenance()["teacher_40step_accuracy"]  # 1000 samples, seed 0 (docs/learned.md)
    labels = torch.arange(200) % 10
    acc = class_accuracy(nets["classifier"], sample_teacher(nets["teacher"], labels, steps=40, seed=1), labels)
    # 200 fresh samples: binomial standard error at most 0.035; allow 3 of them
    tol = 3 * math.sqrt(max(documented * (1 - documented), 0.01) / 200)
    assert acc >= documented - tol, (acc, documented)
    # and the unguided (null-label) teacher is not class-aligned: the labels matter
    uncond = sample_teacher(nets["teacher"], None, steps=40, seed=1, n=200)
    assert class_accuracy(nets["classifier"], uncond, labels) < 0.5


@pytest.mark.parametrize("name", list(STUDENTS))
def test_students_sample_in_every_setting(nets, name):
    labels = torch.arange(50) % 10
    sigmas = timestep_sigmas(trailing_timesteps(4))
    for lab in (None, labels):
        sargs, targs = conditioning(lab)
        x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)) * sigmas[0].item()
        out = kdpp.sample_lcm_distpp(nets[name], guided_teacher(nets["teacher"], lab), x, sigmas, 0.5, 1,
                                     extra_args=sargs, teacher_extra_args=targs, disable=True, seed=0)
        assert out.shape == (50, 64) and bool(torch.isfinite(out).all())


def test_null_label_is_the_unconditional_branch(nets):
    x, s = torch.randn(8, 64), torch.full((8,), 1.0)
    torch.testing.assert_close(nets["teacher"](x, s), nets["teacher"](x, s, torch.full((8,), NULL_CLASS)))
    cfg1 = guided_teacher(nets["teacher"], torch.zeros(8, dtype=torch.long), w=1.0)
    _, targs = conditioning(torch.zeros(8, dtype=torch.long))
    torch.testing.assert_close(cfg1(x, s, **targs), nets["teacher"](x, s, torch.zeros(8, dtype=torch.long)))


def test_frechet_distance_closed_form():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    shift = torch.arange(6, dtype=torch.float64)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + shift) == pytest.approx(float((shift**2).sum()), rel=1e-6)
    # scaling the features by c: tr(C + c^2 C - 2 c C) = (1 - c)^2 tr C, plus the mean shift
    c = 2.0
    want = float(((1 - c) ** 2) * (a.mean(0) ** 2).sum() + (1 - c) ** 2 * torch.cov(a.T).trace())
    assert frechet_distance(a, c * a) == pytest.approx(want, rel=1e-6)


def test_metrics_rank_real_digits_above_noise(nets):
    x, y = load_digits()
    metrics = DigitsMetrics(nets["classifier"], x, y)
    floor = metrics.real_floor(x, seed=0)
    real = metrics(x[:900], y[:900])
    noise = metrics(torch.randn(900, 64).clamp(-1, 1), y[:900])
    assert real["acc"] > 0.95 and noise["acc"] < 0.3
    assert real["fd"] < 3 * floor < noise["fd"]
    assert real["tv"] < 0.05


def test_benchmark_smoke_runs_end_to_end_with_placement(tmp_path, monkeypatch, capsys):
    """--smoke without --out writes into a new temporary folder, not benchmarks/results; the printed table names
    are whole; every row's evaluations and teacher calls are counted; 2 seeds claim no significance."""
    bench = load_script("learned")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    in_tree = [ROOT / "benchmarks" / "results" / f"learned_smoke.{ext}" for ext in ("md", "json")]
    existed = [p.exists() for p in in_tree]
    rows = bench.main(["--smoke"])
    (out,) = tmp_path.glob("kdpp-learned-smoke-*")
    assert (out / "learned_smoke.md").exists() and (out / "learned_smoke.json").exists()
    assert [p.exists() for p in in_tree] == existed == [False, False]
    printed = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("Placement ") for line in printed) == 2
    assert sum(line.startswith("Table 1   ") for line in printed) == 2
    by = {(r["mode"], r["label"]): r for r in rows}
    # network-evaluation accounting: a CFG teacher call is 1 call and 2 evaluations, an unconditional one 1, plain none
    assert (by[("cond", "plain, 4 steps")]["teacher_nfe"], by[("cond", "plain, 4 steps")]["teacher_calls"]) == (0, 0)
    paper = by[("cond", "first step, random/auto")]
    assert (paper["student_nfe"], paper["teacher_nfe"], paper["teacher_calls"]) == (4, 2, 1)
    assert (by[("uncond", "last step, lam 1")]["teacher_nfe"], by[("uncond", "last step, lam 1")]["teacher_calls"]) == (1, 1)
    assert all("diff" in r for r in rows if not r["label"].startswith("plain") and r["who"] != "teacher")
    md = (out / "learned_smoke.md").read_text()
    assert "(n/a)" in md and "]*" not in md
    # the summary is a view of the tables' rows: the same runs, the same differences
    summary = {r["label"]: r for r in bench.summary(rows) if r["mode"] == "cond"}
    assert summary["plain, 4 steps"]["values"] == by[("cond", "plain, 4 steps")]["values"]
    assert summary["first step, lam 0.5 (paper: k = 1, random, tau = next)"]["diff"] == paper["diff"]
    assert f"### {bench.SUMMARY_TITLE}" in md


@pytest.mark.parametrize("where", [[0], [2], [-1]])
def test_placement_guides_exactly_the_chosen_step(nets, where):
    """The benchmark's placement (``guided_steps``, guidance form): one teacher call, on step ``where``, and
    the output is the plain run with ``lam * (T(x_i, s_i) - S(x_i, s_i))`` added on that step."""
    bench = load_script("learned")
    labels = torch.arange(40) % 10
    sargs, targs = conditioning(labels)
    sigmas = timestep_sigmas(trailing_timesteps(5))
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0].item()
    student = copy.deepcopy(nets["small"]).double()
    teacher = guided_teacher(copy.deepcopy(nets["teacher"]).double(), labels)
    calls, states = [], {}

    def counted(x_, s_, **kw):
        calls.append(float(s_[0]))
        return teacher(x_, s_, **kw)

    def run(guide, callback=None):
        return kdpp.sample_lcm_distpp(student, counted, x, sigmas, extra_args=sargs, teacher_extra_args=targs,
                                      noise_sampler=kdpp.seeded_noise_sampler(x, 1), callback=callback, disable=True,
                                      **guide)

    plain = run(bench.first_k(0, 0.0), callback=lambda info: states.setdefault(info["i"], info["x"]))
    assert calls == []
    guided = run(bench.placement(where, 0.7))
    i = where[0] % 5
    assert calls == [pytest.approx(float(sigmas[i]))]
    s_in = torch.full((40,), float(sigmas[i]), dtype=torch.float64)
    correction = 0.7 * (teacher(states[i], s_in, **targs) - student(states[i], s_in, **sargs))
    if i == 4:  # the last step: the correction is the only difference
        torch.testing.assert_close(guided, plain + correction)
    else:  # an earlier step changes the rest of the trajectory
        assert not torch.allclose(guided, plain)


@pytest.mark.slow
def test_training_script_writes_loadable_nets_and_provenance(tmp_path):
    train = load_script("train_learned")
    out = tmp_path / "nets.pt"
    train.main(["--teacher-iters", "100", "--classifier-iters", "50", "--trajectories", "512", "--heldout", "64",
                "--teacher-hidden", "64", "--eval-every", "20", "--patience", "1", "--lr-drops", "1", "--max-iters", "200",
                "--students", "strong", "small", "--no-fd", "--out", str(out)])
    nets = load_nets(out)
    assert set(nets) == {"teacher", "classifier", "strong", "small"}
    prov = provenance(tmp_path / "provenance.json")
    assert prov["seed"] == 0 and prov["args"]["teacher_iters"] == 100 and prov["git_revision"]
    assert set(prov["seconds"]) >= {"classifier", "teacher", "trajectories", "total"}
    for name in ("strong", "small"):
        record = prov["students"][name]
        assert record["stopped_by"] in ("plateau", "max_iters") and record["evaluations"]
        assert record["iterations"] == record["evaluations"][-1]["iter"]


def test_metrics_refuse_too_few_samples_naming_the_argument(nets):
    """FD needs a full-rank feature covariance: at least features + 1 = 65 samples; fewer are a ValueError naming x
    or real (not a numpy matmul error, nor a silently meaningless FD)."""
    x, y = load_digits()
    metrics = DigitsMetrics(nets["classifier"], x[:400], y[:400])
    assert metrics.min_samples() == 65
    for n in (1, 5, 64):
        with pytest.raises(ValueError, match=r"^x has \d+ samples; FD needs at least 65"):
            metrics(x[:n])
    assert metrics(x[400:465])["fd"] >= 0  # 65 is enough
    with pytest.raises(ValueError, match="^real has 5 samples"):
        DigitsMetrics(nets["classifier"], x[:5], y[:5])
    with pytest.raises(ValueError, match="^real has 100 samples; real_floor needs at least 130"):
        metrics.real_floor(x[:100], seed=0)


@pytest.mark.parametrize("bad", [10, 11, -1])
def test_labels_out_of_range_are_value_errors_naming_labels(nets, bad):
    """Labels outside 0..9 are ValueErrors naming the argument (labels, real_labels, class_labels), not shape
    mismatches or an embedding IndexError; the nets also take the null label 10 (their unconditional branch)."""
    x, y = load_digits()
    metrics = DigitsMetrics(nets["classifier"], x[:200], y[:200])
    labels = y[200:300].clone()
    labels[3] = bad
    with pytest.raises(ValueError, match=rf"^labels must be classes 0\.\.9 \(for unconditional .*got \[{bad}\]"):
        metrics(x[200:300], labels)
    with pytest.raises(ValueError, match=r"^labels must be classes 0\.\.9"):
        class_accuracy(nets["classifier"], x[200:300], labels)
    with pytest.raises(ValueError, match=r"^real_labels must be classes 0\.\.9"):
        DigitsMetrics(nets["classifier"], x[200:300], labels)
    if bad != NULL_CLASS:  # the nets take the null label (unconditional branch), nothing else out of range
        with pytest.raises(ValueError, match=rf"^labels must be classes 0\.\.9 or the null label 10, got \[{bad}\]"):
            sample_teacher(nets["teacher"], labels[:4], steps=2)
        with pytest.raises(ValueError, match=r"^class_labels must be classes 0\.\.9 or the null label 10"):
            nets["teacher"](x[:4], torch.ones(4), class_labels=labels[:4])
    else:
        assert sample_teacher(nets["teacher"], labels[:4], steps=2).shape == (4, 64)
    with pytest.raises(ValueError, match=r"^labels must have shape \[100\]"):
        metrics(x[200:300], y[:99])


def test_mean_ci_of_one_seed_is_undefined_not_zero_width():
    from kdpp.learned import mean_ci

    one = mean_ci([1.0])
    assert one.value == 1.0 and math.isnan(one.low) and math.isnan(one.high)
    two = mean_ci([1.0, 2.0])
    assert two.low < 1.5 < two.high
    with pytest.raises(ValueError, match="^values must be a non-empty sequence"):
        mean_ci([])


def test_sample_teacher_unconditional_needs_n(nets):
    """Unconditional sampling needs n: a missing or non-positive n is a ValueError naming it, and n must match the
    labels when both are given."""
    for n in (None, 0, 2.5):
        with pytest.raises(ValueError, match=r"^sample_teacher\(teacher, labels=None\) samples n unconditional digits"):
            sample_teacher(nets["teacher"], None, steps=2, n=n)
    with pytest.raises(ValueError, match=r"^n must be None or len\(labels\) \(3\)"):
        sample_teacher(nets["teacher"], torch.arange(3), steps=2, n=5)
    assert sample_teacher(nets["teacher"], None, steps=2, n=3).shape == (3, 64)


SD = 0.6
CLASS_MEANS = torch.linspace(-1, 1, 11, dtype=torch.float64)[:, None] * torch.ones(64, dtype=torch.float64)
CLASS_MEANS[NULL_CLASS] = 0.0


def gaussian_teacher(x, sigma, class_labels=None):
    """The exact denoiser of N(m_c, SD^2 I) (m of the null class: 0): D = m + (x - m) SD^2 / (s^2 + SD^2)."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    m = 0.0 if class_labels is None else CLASS_MEANS[class_labels]
    return m + (x - m) * SD**2 / (s**2 + SD**2)


def gaussian_endpoint(x, sigma, mean=0.0):
    """The probability-flow ODE endpoint of N(mean, SD^2 I) from (x, sigma): mean + (x - mean) SD / sqrt(s^2 + SD^2)."""
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    return mean + (x - mean) * SD / (s**2 + SD**2).sqrt()


def test_oracle_student_is_the_teachers_ode_endpoint_closed_form():
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    oracle = TeacherODEStudent(gaussian_teacher, steps=96)  # DPM++ 2M: second order, error 1e-3 at 96 steps
    for sigma in (14.6, 2.0, 0.3):
        torch.testing.assert_close(oracle(x, sigma), gaussian_endpoint(x, sigma), rtol=1e-3, atol=1e-3)
    # items at different levels are integrated separately (as one call each)
    sigmas = torch.tensor([14.6, 0.3, 14.6, 2.0, 0.3, 2.0])
    torch.testing.assert_close(oracle(x, sigmas), gaussian_endpoint(x, sigmas), rtol=1e-3, atol=1e-3)
    # with class labels: the CFG teacher's ODE; CFG w of Gaussians with means m_c, 0 is the Gaussian of mean w m_c
    labels = torch.tensor([0, 3, 9, NULL_CLASS, 5, 1])
    want = gaussian_endpoint(x, 2.0, mean=2.5 * CLASS_MEANS[labels])
    torch.testing.assert_close(TeacherODEStudent(gaussian_teacher, w=2.5, steps=96)(x, 2.0, labels), want,
                               rtol=1e-3, atol=1e-3)


def test_oracle_student_calls_the_teacher_steps_times_per_level():
    calls = []

    def teacher(x, sigma, class_labels=None):
        calls.append(x.shape[0])
        return gaussian_teacher(x, sigma, class_labels)

    x = torch.randn(4, 64, dtype=torch.float64)
    TeacherODEStudent(teacher, steps=10)(x, torch.tensor([3.0, 3.0, 1.0, 1.0]))
    assert calls == [2] * 20  # 10 DPM++ 2M steps for each of the two levels
    calls.clear()
    TeacherODEStudent(teacher, w=4.0, steps=10)(x, 3.0, torch.arange(4))
    assert calls == [8] * 10  # one batched CFG call ([uncond, cond]) per step
    with pytest.raises(ValueError, match="^steps must be an int >= 1"):
        TeacherODEStudent(teacher, steps=0)


def test_sample_student_is_paired_and_counts_evaluations(nets):
    labels = torch.arange(30) % 10
    plain = sample_student(nets["small"], labels, 3, seed=5)
    s, t = CountedNet(nets["small"], 30), CountedNet(nets["teacher"], 30)
    off = sample_student(s, labels, 3, seed=5, teacher=t, lam=0.0, k=1)
    torch.testing.assert_close(off, plain, rtol=0, atol=0)  # same initial and solver noise
    assert (s.evals, s.calls, t.evals, t.calls) == (3, 3, 0, 0)
    on = sample_student(s, labels, 3, seed=5, teacher=t, lam=0.5, k=1)
    assert (s.evals, t.evals, t.calls) == (6, 2, 1)  # one CFG teacher call: 2 evaluations
    assert not torch.allclose(on, plain)
    assert not torch.allclose(sample_student(nets["small"], labels, 3, seed=6), plain)


def test_sample_teacher_on_the_students_schedule_starts_at_its_first_sigma(nets):
    seen = []

    def teacher(x, sigma, **kw):
        seen.append(float(sigma[0]))
        return nets["teacher"](x, sigma, **kw)

    sample_teacher(teacher, None, steps=3, n=4, schedule="trailing")
    torch.testing.assert_close(torch.tensor(seen), timestep_sigmas(trailing_timesteps(3))[:3].float())
    with pytest.raises(ValueError, match="^schedule must be 'karras' or 'trailing'"):
        sample_teacher(teacher, None, steps=3, n=4, schedule="linear")


def after_best(fd: list[float]) -> float:
    """How much worse than its best step count a student gets at more steps: max over n >= best of FD_n / FD_best."""
    best = min(range(len(fd)), key=fd.__getitem__)
    return max(fd[best:]) / fd[best]


@pytest.mark.slow  # 1000 samples of three students at six step counts; the quick run keeps the nets' accuracy tests
def test_students_distilled_at_the_teachers_cfg_meet_the_bars(nets):
    """At 4 steps within 2.5x the 40-step teacher's FD (strong, teacher_init); unconditionally never more than 1.3x
    worse than the best step count at more steps (1000 samples, seed 0). With the CFG-4 teacher more steps cost more
    (the oracle, the teacher's own ODE endpoint, too: docs/learned.md), but less than the old students' 3x."""
    x, y = load_digits()
    metrics = DigitsMetrics(nets["classifier"], x, y)
    labels = torch.arange(1000) % 10
    teacher = {lab is None: metrics(sample_teacher(nets["teacher"], lab, 40, n=1000), lab)["fd"] for lab in (None, labels)}
    for lab in (None, labels):
        for name in ("strong", "teacher_init"):
            fd = [metrics(sample_student(nets[name], lab, steps, n=1000), lab)["fd"] for steps in range(1, 7)]
            assert fd[3] <= 2.5 * teacher[lab is None], (name, lab is None, fd[3], teacher[lab is None])
            assert after_best(fd) <= (1.3 if lab is None else 1.6), (name, lab is None, fd)
    small = [metrics(sample_student(nets["small"], None, steps, n=1000))["fd"] for steps in range(1, 7)]
    assert after_best(small) <= 1.3 and small[3] > 2.5 * teacher[True]
