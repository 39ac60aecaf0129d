"""The newcomer's main job: python -m kdpp.demo."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
