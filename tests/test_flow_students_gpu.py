"""FLUX-size Distillation++ on a GPU (``pytest -m gpu``): benchmarks/flow_gpu.py's measurement, recorded.

Also a CPU smoke run of the same code with diffusers' tiny configuration, so the GPU run cannot
fail on a plain bug.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "flow_gpu.py"


def flow_gpu():
    spec = importlib.util.spec_from_file_location("flow_gpu", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_smoke_run_on_cpu(tmp_path):
    result = flow_gpu().run(tiny=True, repeats=1, out=tmp_path)
    assert result["finite"] and (result["teacher_calls_plain"], result["teacher_calls_guided"]) == (0, 1)
    assert "Guided / plain wall time" in (tmp_path / "flow_gpu.md").read_text()


@pytest.mark.gpu
def test_flux_size_guided_vs_plain_on_gpu():
    """Writes benchmarks/results/flow_gpu.{json,md}; the teacher is called once, and costs no activation memory
    beyond the student's (both models' weights are resident in both runs)."""
    result = flow_gpu().run(repeats=3)
    assert result["finite"] and (result["teacher_calls_plain"], result["teacher_calls_guided"]) == (0, 1)
    assert result["peak_guided_gib"] <= result["peak_plain_gib"] + 0.25
    assert torch.cuda.get_device_name() in result["device"]
