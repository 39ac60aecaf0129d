"""The benchmark scripts print what their committed results say (format, statistics)."""
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

INTERVAL = r"-?\d+\.\d{3} \[-?\d+\.\d{3}, -?\d+\.\d{3}\]"


def test_wrapper_vs_paper_header_matches_its_intervals_and_the_committed_file(tmp_path):
    """The table shows mean [low, high] under a header that says so; the committed file is in that format.

    (Before: the header said "Mean ± 95% t-interval" over [low, high] cells, and the committed file was in the
    old "± half-width" format.)
    """
    pytest.importorskip("k_diffusion")
    import wrapper_vs_paper

    wrapper_vs_paper.main(["--seeds", "2", "--n", "200", "--out", str(tmp_path)])
    fresh = (tmp_path / "wrapper_vs_paper.md").read_text().splitlines()
    committed = (ROOT / "benchmarks/results/wrapper_vs_paper.md").read_text().splitlines()
    for lines in (fresh, committed):
        assert "±" not in "\n".join(lines)
        assert lines[0].endswith("Mean over seeds [95% t-interval over seeds] (lower is better).")
        rows = [line for line in lines if line.startswith("| ") and not line.startswith("| sampler")]
        assert len(rows) == 16
        assert all(re.fullmatch(rf"\| .+ \| \d \| {INTERVAL} \| {INTERVAL} \|", row) for row in rows), rows
    assert fresh[2:4] == committed[2:4]
