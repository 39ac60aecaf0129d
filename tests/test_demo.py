"""The newcomer's main job: python -m kdpp.demo."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kdpp import demo
from kdpp.toy import Estimate

ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_and_writes_results_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    assert demo.main(["--n", "300", "--out", str(tmp_path), "--student", "truncated"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    names = [r["run"] for r in result["rows"]]
    assert names[:3] == ["student 4 steps", "student 5 steps", "student++ 4 steps, k=1"]
    assert all({"value", "low", "high"} <= set(r["nll"]) for r in result["rows"])
    assert [("sliced_w2_minus_student" in r) for r in result["rows"]] == [False, True, True, True, False, False]
    assert all({"value", "low", "high"} <= set(r["sliced_w2_minus_student"]) for r in result["rows"][1:4])
    for png in ("samples.png", "trajectories.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_demo_options(solver, tmp_path):
    assert demo.main(["--n", "200", "--out", str(tmp_path), "--no-figures", "--solver", solver, "--student",
                      "truncated", "--k", "2", "--lam", "0.5", "--renoise", "deterministic", "--seed", "3"]) == 0


def test_demo_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdpp.demo", "--help"], capture_output=True, text=True, check=True)
    assert "--solver" in out.stdout and "--student" in out.stdout


def test_table_prints_intervals_not_plus_minus():
    """Issue 10 item 14: the demo's table shows each bootstrap interval as [low, high] (they are asymmetric)."""
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


def test_demo_without_matplotlib_says_so_up_front_and_still_reports(tmp_path):
    """Issue 10 item 17: without matplotlib the demo notes it before computing, skips the figures, exits 0.

    (Before: ~40 s of sampling, then a ModuleNotFoundError traceback and no results.json.)
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", BLOCK_MATPLOTLIB, "--n", "100", "--student", "truncated", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "pip install 'kdpp[demo]'" in lines[0]  # before the run starts
    assert "Traceback" not in proc.stderr
    assert any(line.startswith("student++ 4 steps") for line in lines)
    assert (tmp_path / "results.json").exists()
    assert not list(tmp_path.glob("*.png"))
    assert sum("kdpp[demo]" in line for line in lines) == 1


def _run(*options: str) -> dict:
    return demo.run(demo.parse_args(["--n", "100", "--student", "truncated", "--no-figures", *options]))


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2s_ancestral", "lcm"])
@pytest.mark.parametrize("off", [["--k", "0"], ["--lam", "0"]])
def test_student_pp_without_teacher_is_the_student_for_stochastic_solvers(solver, off):
    """Each run gets a fresh solver noise sampler from the same seed, so the comparison is paired.

    (Before: one stateful sampler shared by all runs; euler_ancestral with --k 0 gave mode TV 0.115 vs 0.095.)
    """
    result = _run("--solver", solver, *off)
    student, pp = result["rows"][0], result["rows"][2]
    assert torch.equal(result["samples"][student["run"]], result["samples"][pp["run"]])
    assert (pp["nll"], pp["mode_tv"], pp["sliced_w2"]) == (student["nll"], student["mode_tv"], student["sliced_w2"])
    assert tuple(pp["sliced_w2_minus_student"]) == (0.0, 0.0, 0.0)
    assert pp["teacher_nfe"] == 0 and pp["student_nfe"] == student["student_nfe"]


def _nfe(rows: list[dict]) -> list[tuple[int, int]]:
    return [(r["student_nfe"], r["teacher_nfe"]) for r in rows]


def test_nfe_column_counts_real_model_calls():
    """NFE S+T is counted, not steps + k. (Before: --steps 1 showed 1+1, --k 4 of 4 showed 4+4, 2s-ancestral 4+1.)"""
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
    (["--k", "5"], "--k"),
])
def test_bad_options_are_argparse_errors_naming_the_option(options, named, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.parse_args(options)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"error: {named} must" in err and "Traceback" not in err


def test_trajectories_figure_explains_its_arrows(tmp_path, monkeypatch):
    """trajectories.png has a legend for the blue paths and the red D -> R(D) arrows and a caption saying what
    they are and how many guided steps are drawn (before: red arrows, explained nowhere in the figure)."""
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
