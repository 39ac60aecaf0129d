"""The pipeline benchmarks run and print what their committed results say (their smoke modes, on the CPU)."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
pytest.importorskip("diffusers", reason="the diffusers extra is not installed")
pytest.importorskip("peft", reason="the Wan benchmark's LoRA needs peft")


@pytest.mark.slow
def test_offload_benchmark_smoke_run_calls_the_teacher_once_per_guided_run(tmp_path):
    """--smoke runs both offloading cases in their own processes (tiny FLUX config, CPU): one teacher call per guided
    run, finite latents, and the table format of the committed smoke results; without CUDA the full benchmark
    records that it did not measure."""
    import pipeline_offload

    assert pipeline_offload.main(["--smoke", "--repeats", "1", "--out", str(tmp_path)]) == 0
    for path in (tmp_path / "pipeline_offload_smoke.md", ROOT / "benchmarks/results/pipeline_offload_smoke.md"):
        rows = [line for line in path.read_text().splitlines() if line.startswith("| guided_")]
        assert [row.split(" | ")[0] for row in rows] == ["| guided_group_offload", "| guided_model_offload"]
        assert all(re.search(r"\| \*\*\d+\.\d{3}\*\* \| 1 \| True \|$", row) for row in rows), rows
    committed = (ROOT / "benchmarks/results/pipeline_offload.md").read_text()
    import torch

    if not torch.cuda.is_available():
        assert pipeline_offload.main(["--out", str(tmp_path)]) == 0
        assert "Not measured: no GPU" in (tmp_path / "pipeline_offload.md").read_text()
    assert "Not measured: no GPU" in committed or "within" in committed
