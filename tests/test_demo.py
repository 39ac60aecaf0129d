"""The newcomer's main job: python -m kdpp.demo (the learned digits by default, the analytic toy with --toy)."""
import json
import sys
import textwrap

import pytest
import torch

from kdpp import demo
from kdpp.toy import Estimate


#: the toy demo with few bootstrap resamples: the intervals get coarser, nothing else changes
TOY = ["--toy", "--boot", "20"]


def test_toy_demo_runs_and_writes_results_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    assert demo.main([*TOY, "--n", "300", "--out", str(tmp_path), "--student", "truncated"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    names = [r["run"] for r in result["rows"]]
    assert names[:3] == ["student 4 steps", "student 5 steps", "student++ 4 steps, k=1"]
    assert all({"value", "low", "high"} <= set(r["nll"]) for r in result["rows"])
    assert [("sliced_w2_minus_student" in r) for r in result["rows"]] == [False, True, True, True, False, False]
    assert all({"value", "low", "high"} <= set(r["sliced_w2_minus_student"]) for r in result["rows"][1:4])
    for png in ("samples.png", "trajectories.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_toy_demo_options(solver, tmp_path):
    assert demo.main([*TOY, "--n", "100", "--out", str(tmp_path), "--no-figures", "--solver", solver, "--student",
                      "truncated", "--k", "2", "--lam", "0.5", "--renoise", "deterministic", "--seed", "3"]) == 0


def test_demo_module_entry_point(monkeypatch, capsys):
    """`python -m kdpp.demo --help`, run as `-m` runs it (runpy, a fresh copy of the module as __main__)."""
    import runpy

    monkeypatch.delitem(sys.modules, "kdpp.demo")
    monkeypatch.setattr(sys, "argv", ["kdpp.demo", "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("kdpp.demo", run_name="__main__", alter_sys=True)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--toy" in out and "--students" in out and "--solver" not in out


def test_toy_help_lists_the_toy_options(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--toy", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--solver" in out and "--student" in out and "--boot" in out


def test_table_prints_intervals_not_plus_minus():
    """The toy demo's table shows each bootstrap interval as [low, high] (they are asymmetric), never ±."""
    est = Estimate(0.264, 0.222, 0.495)
    rows = [{"run": "a", "student_nfe": 4, "teacher_nfe": 0, "seconds": 1.0, "nll": est, "mode_tv": est,
             "sliced_w2": est},
            {"run": "b", "student_nfe": 4, "teacher_nfe": 1, "seconds": 1.0, "nll": est, "mode_tv": est,
             "sliced_w2": est, "sliced_w2_minus_student": Estimate(-0.18, -0.22, -0.13)}]
    out = demo.table(rows)
    assert "±" not in out
    assert out.count("0.264 [0.222, 0.495]") == 6
    assert "-0.18 [-0.22, -0.13]" in out


BLOCK_MATPLOTLIB = textwrap.dedent("""
    import sys

    class NoMatplotlib:  # as if `pip install kdpp` without the demo extra
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "matplotlib":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, NoMatplotlib())
    from kdpp.demo import main
    sys.exit(main(sys.argv[1:]))
""")


def test_demo_without_matplotlib_says_so_up_front_and_still_reports(tmp_path, fresh_python):
    """Without matplotlib the demo notes it before computing, skips the figures, still writes results.json and
    exits 0 (no traceback after the sampling)."""
    proc = fresh_python(["-c", BLOCK_MATPLOTLIB, *TOY, "--n", "100", "--student", "truncated", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "pip install 'kdpp[demo]'" in lines[0]  # before the run starts
    assert "Traceback" not in proc.stderr
    assert any(line.startswith("student++ 4 steps") for line in lines)
    assert (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob("*.png"))
    assert sum("kdpp[demo]" in line for line in lines) == 1


def _run(*options: str) -> dict:
    return demo.run(demo.parse_args([*TOY, "--n", "100", "--student", "truncated", "--no-figures", *options]))


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2s_ancestral", "lcm"])
@pytest.mark.parametrize("off", [["--k", "0"], ["--lam", "0"]])
def test_student_pp_without_teacher_is_the_student_for_stochastic_solvers(solver, off):
    """Each run gets a fresh solver noise sampler from the same seed, so the comparison is paired: with no
    teacher call student++ is the student, sample for sample."""
    result = _run("--solver", solver, *off)
    student, pp = result["rows"][0], result["rows"][2]
    assert torch.equal(result["samples"][student["run"]], result["samples"][pp["run"]])
    assert (pp["nll"], pp["mode_tv"], pp["sliced_w2"]) == (student["nll"], student["mode_tv"], student["sliced_w2"])
    assert tuple(pp["sliced_w2_minus_student"]) == (0.0, 0.0, 0.0)
    assert pp["teacher_nfe"] == 0 and pp["student_nfe"] == student["student_nfe"]


def _nfe(rows: list[dict]) -> list[tuple[int, int]]:
    return [(r["student_nfe"], r["teacher_nfe"]) for r in rows]


def test_nfe_column_counts_real_model_calls():
    """NFE S+T is counted model calls, not steps + k (a step to sigma 0 may call no teacher; a two-stage solver
    calls the student twice per step)."""
    one = _run("--steps", "1")["rows"]  # the only step is a step to 0: renoised at its own level, one call
    assert _nfe(one)[:4] == [(1, 0), (2, 0), (1, 1), (0, 2)]  # the teacher at equal NFE: 2 calls
    assert one[3]["run"] == "teacher 2 steps"
    all_guided = _run("--k", "4")["rows"]
    assert _nfe(all_guided)[:4] == [(4, 0), (5, 0), (4, 4), (0, 8)]
    assert all_guided[3]["run"] == "teacher 8 steps"
    two_stage = _run("--solver", "dpmpp_2s_ancestral")["rows"]
    # 2 calls per step, 1 on the last (k-diffusion takes an Euler step when sigma_down = 0); the guided step
    # corrects both stages; the teacher at equal NFE: 5 steps = 9 calls
    assert _nfe(two_stage)[:4] == [(7, 0), (9, 0), (7, 2), (0, 9)]
    assert two_stage[3]["run"] == "teacher 5 steps"
    assert _nfe(two_stage)[4:] == [(0, 100), (0, 0)]


def test_nfe_of_the_student_matches_k_diffusion():
    """The student-only count equals k-diffusion's own sampler's calls (the oracle), for a two-stage solver."""
    k_sampling = pytest.importorskip("k_diffusion.sampling")
    rows = _run("--solver", "dpmpp_2s_ancestral", "--steps", "3")["rows"]
    for row, steps in ((rows[0], 3), (rows[1], 4)):
        calls = []

        def model(x, sigma):
            calls.append(1)
            return torch.zeros_like(x)

        from kdpp.schedules import timestep_sigmas, trailing_timesteps

        k_sampling.sample_dpmpp_2s_ancestral(model, torch.randn(2, 2, dtype=torch.float64) * 14.6,
                                             timestep_sigmas(trailing_timesteps(steps)), disable=True)
        assert row["student_nfe"] == len(calls)


@pytest.mark.parametrize("options, named", [
    (["--steps", "0"], "--steps"), (["--steps", "-2"], "--steps"), (["--lam", "nan"], "--lam"),
    (["--lam", "inf"], "--lam"), (["--n", "1"], "--n"), (["--n", "99"], "--n"), (["--k", "-1"], "--k"),
    (["--k", "5"], "--k"), (["--boot", "5"], "--boot"),
])
def test_bad_toy_options_are_argparse_errors_naming_the_option(options, named, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--toy", *options])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {named} must" in err and "Traceback" not in err


def test_trajectories_figure_explains_its_arrows(tmp_path, monkeypatch):
    """trajectories.png has a legend for the blue paths and the red D -> R(D) arrows and a caption saying what
    they are and how many guided steps are drawn."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    closed = []
    monkeypatch.setattr(plt, "close", closed.append)
    result = _run("--k", "2")
    demo.figures(result, tmp_path)
    trajectories = closed[1]
    labels = [t.get_text() for t in trajectories.axes[1].get_legend().get_texts()]
    assert labels == ["sample path x_i (16 samples)", "teacher's correction D -> R(D)"]
    (caption,) = trajectories.texts
    assert "Red arrows" in caption.get_text() and "(2 guided step(s) drawn; lam = 1.0, k = 2)" in caption.get_text()
    monkeypatch.undo()
    for fig in closed:
        plt.close(fig)


def test_table_says_the_time_is_one_run():
    est = Estimate(0.264, 0.222, 0.495)
    out = demo.table([{"run": "a", "student_nfe": 4, "teacher_nfe": 0, "seconds": 1.0, "nll": est, "mode_tv": est,
                       "sliced_w2": est}])
    assert out.splitlines()[0].endswith("time (1 run)") and out.splitlines()[2].endswith(" 1.00s")


# the digits demo (the default)

DIGITS = ["--students", "small", "weakcfg", "--n", "200", "--steps", "3"]


def test_default_demo_is_the_learned_digits_with_every_trained_student():
    from kdpp.learned import STUDENTS

    args = demo.parse_args([])
    assert not args.toy and args.students == list(STUDENTS) and args.steps == 4


def test_toy_options_without_toy_say_to_add_it(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(["--solver", "lcm"])
    assert exc.value.code == 2
    assert "error: --solver: an option of the toy demo; add --toy" in capsys.readouterr().err


@pytest.mark.parametrize("options, named", [
    (["--steps", "0"], "--steps"), (["--n", "100"], "--n"), (["--k", "5"], "--k"), (["--lam", "nan"], "--lam"),
    (["--guided-steps", "4"], "--guided-steps"), (["--seeds", "0"], "--seeds"),
])
def test_bad_digits_options_are_argparse_errors_naming_the_option(options, named, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(options)
    assert exc.value.code == 2
    assert f"error: {named} must" in capsys.readouterr().err


def test_digits_demo_shows_students_plain_with_the_teacher_and_the_teacher_at_equal_cost(tmp_path, capsys):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    assert demo.main([*DIGITS, "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    rows = {r["run"]: r for r in result["rows"]}
    names = list(rows)
    assert names[0] == "small, 3 steps" and names[3] == "weakcfg, 3 steps"
    # one student++ run per --lam: the documented default (0.1) and the paper's scale (0.5)
    assert names[1] == "small + teacher (k=1, lam 0.1, renoise random)"
    assert names[2] == "small + teacher (k=1, lam 0.5, renoise random)"
    # counted network evaluations per sample: a CFG teacher call is 2; the teacher alone gets the same budget
    assert [(r["student_evals"], r["teacher_evals"]) for r in result["rows"]] == [
        (3, 0), (3, 2), (3, 2), (3, 0), (3, 2), (3, 2), (0, 4), (0, 80)]
    assert names[6] == "teacher, 2 steps (equal NFE)" and names[7] == "teacher, 40 steps"
    for r in result["rows"]:
        assert len(r["fd"]) == 3 and r["fd_ci"][1] <= r["fd_ci"][0] <= r["fd_ci"][2]
        assert 0 <= r["acc_ci"][0] <= 1
    # student++ minus plain, per seed (paired)
    pp, plain = rows[names[5]], rows[names[3]]
    assert pp["fd_diff"][0] == pytest.approx(sum(a - b for a, b in zip(pp["fd"], plain["fd"])) / 3)
    assert "fd_diff" not in plain
    assert (tmp_path / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "python -m kdpp.demo --toy" in out and "(n/a" not in out


def test_digits_demo_with_two_seeds_claims_no_significance(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert demo.main(["--students", "small", "--n", "200", "--steps", "2", "--seeds", "2", "--lam", "0.5",
                      "--no-figures", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    (pp,) = [line for line in lines if line.startswith("small + teacher")]
    assert pp.count("(n/a: 2 seeds)") == 2 and "*" not in pp and "n.s." not in pp


BLOCK_SKLEARN = BLOCK_MATPLOTLIB.replace('"matplotlib"', '"sklearn"')


def test_digits_demo_without_scikit_learn_says_how_to_get_it(tmp_path, fresh_python):
    proc = fresh_python(["-c", BLOCK_SKLEARN, "--out", str(tmp_path)])
    assert proc.returncode == 1
    assert "the digits demo needs scikit-learn: pip install 'kdpp[demo]'" in proc.stderr
    assert "python -m kdpp.demo --toy" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())
