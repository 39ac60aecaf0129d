"""The newcomer's main job: python -m kdpp.demo."""
import json
import subprocess
import sys

import pytest

from kdpp import demo


def test_demo_runs_and_writes_results_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    assert demo.main(["--n", "300", "--out", str(tmp_path), "--student", "truncated"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    names = [r["run"] for r in result["rows"]]
    assert names[:3] == ["student 4 steps", "student 5 steps", "student++ 4 steps, k=1"]
    assert all({"value", "low", "high"} <= set(r["nll"]) for r in result["rows"])
    for png in ("samples.png", "trajectories.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("solver", ["euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_demo_options(solver, tmp_path):
    assert demo.main(["--n", "200", "--out", str(tmp_path), "--no-figures", "--solver", solver, "--student",
                      "truncated", "--k", "2", "--lam", "0.5", "--renoise", "deterministic", "--seed", "3"]) == 0


def test_demo_module_entry_point(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdpp.demo", "--help"], capture_output=True, text=True, check=True)
    assert "--solver" in out.stdout and "--student" in out.stdout
