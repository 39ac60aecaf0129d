"""The benchmark scripts print what their committed results say (format, statistics)."""
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

INTERVAL = r"-?\d+\.\d{3} \[-?\d+\.\d{3}, -?\d+\.\d{3}\]"


def test_wrapper_vs_paper_header_matches_its_intervals_and_the_committed_file(tmp_path, monkeypatch):
    """The table shows mean [low, high] under a header that says so, with no "± half-width" anywhere; the committed
    file is in that format."""
    pytest.importorskip("k_diffusion")
    import wrapper_vs_paper

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the script's 2 threads: the suite keeps its one
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


def test_performance_overhead_ratio_is_the_median_of_the_ratios_its_iqr_describes(monkeypatch):
    """The reported ratio is the median of the per-repeat ratios, whose IQR is reported beside it, so it lies inside
    that IQR (a ratio of the two medians comes from other repeats and can lie outside it)."""
    pytest.importorskip("k_diffusion")
    import performance

    kdpp_times = [1.0, 2.0, 3.0, 4.0, 5.0]
    ratios = [0.9, 0.9, 0.5, 0.9, 0.9]  # repeat 3 is an outlier: the ratio of medians would be 3 / 4.44 = 0.675
    draws = iter([t for a, r in zip(kdpp_times, ratios) for t in (a, a / r)] * 4)  # ours, theirs, ... per sampler
    monkeypatch.setattr(performance, "timed", lambda fn, repeats: [next(draws)])
    rows = performance.overhead(5, (1, 1, 2, 2))
    assert len(rows) == 4
    for row in rows:
        assert row["ratio"] == pytest.approx(0.9)
        assert row["ratio_iqr"][0] <= row["ratio"] <= row["ratio_iqr"][1]
        assert row["ratio_iqr"] == pytest.approx([0.9, 0.9])
        assert row["kdpp_ms"] == pytest.approx(3e3)


def test_median_iqr_contains_the_median():
    import performance

    for values in ([3.0], [1.0, 5.0], [0.867, 0.868, 0.876, 0.9, 0.1, 0.87, 0.88]):
        median, (low, high) = performance.median_iqr(values)
        assert low <= median <= high
    assert performance.median_iqr(range(41)) == (20, [10, 30])


def test_claims_quick_writes_to_a_fresh_temporary_folder_with_counted_calls_and_no_verdicts(tmp_path, monkeypatch):
    """A --quick run never touches benchmarks/results or docs/img unless --out / --figures say so; every row
    carries the teacher calls counted by a wrapper; 2 seeds give no better/worse verdicts."""
    pytest.importorskip("matplotlib")
    import claims
    from kdpp.toy import FlowMapStudent

    committed = {p: p.stat().st_mtime_ns for p in [*(ROOT / "benchmarks/results").glob("claims.*"),
                                                    *(ROOT / "docs/img").glob("sweep_*.png")]}
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    real_sample = claims.sample

    def quick_sample(truth, student, teacher, solver, steps, lam, k, seed, n, **options):
        """The real sampler on 16 points, scored on a cheap stand-in sample: the counts are real."""
        _, seconds, calls = real_sample(truth, student, teacher, solver, steps, lam, k, seed, 16, **options)
        return truth.sample(n, torch.Generator().manual_seed(seed)), seconds, calls

    monkeypatch.setattr(claims, "sample", quick_sample)
    # every table's student: the cheap 2-step flow map (the exact ones integrate an ODE per call)
    monkeypatch.setattr(claims, "students_for", lambda truth, name: dict.fromkeys(
        ["weights", "wide", "truncated", "trained"], FlowMapStudent(truth, steps=2)))
    monkeypatch.setattr(claims, "FlowMapStudent", lambda mixture: FlowMapStudent(mixture, steps=2))  # poor_teacher's
    result = claims.main(["--quick", "--n", "64"])
    (out,) = tmp_path.glob("kdpp-claims-quick-*")
    assert {p.name for p in out.iterdir()} == {"claims.json", "claims.md", "sweep_lam.png", "sweep_k.png"}
    assert {p: p.stat().st_mtime_ns for p in committed} == committed
    assert {(row["solver"], row["teacher_calls"]) for row in result["table1"]} == {("euler", 1), ("lcm", 1)}
    assert [row["teacher_calls"] for row in result["sweeps"]["k"]] == [0, 1, 2]
    md = (out / "claims.md").read_text()
    assert "(better)" not in md and "(worse)" not in md and "(n.s.)" not in md and "(n/a)" in md


def test_claims_counts_the_calls_a_two_stage_step_makes():
    """A guided DPM++ 2S ancestral step corrects both stages: k = 1 is 2 teacher calls, counted, not k."""
    import claims
    from kdpp.toy import ring

    truth = ring()
    student = claims.students_for(truth, "ring")["weights"]
    _, _, calls = claims.sample(truth, student, truth.denoiser, "dpmpp_2s_ancestral", 4, 1.0, 1, 0, 64)
    assert calls == 2
    _, _, calls = claims.sample(truth, student, None, "euler", 4, 0.0, 0, 0, 64)
    assert calls == 0


def test_claims_verdict_needs_three_seeds():
    import claims

    assert claims.verdict(claims.interval([-0.015, -0.015])) == "n/a"  # zero width, 2 seeds: no claim
    assert claims.verdict(claims.interval([-1.0, -1.1, -0.9])) == "better"
    assert claims.verdict(claims.interval([1.0, 1.1, 0.9])) == "worse"
    assert claims.verdict(claims.interval([-1.0, 1.1, 0.1])) == "n.s."


def test_performance_quick_writes_to_a_fresh_temporary_folder(tmp_path, monkeypatch):
    import performance

    committed = {p: p.stat().st_mtime_ns for p in (ROOT / "benchmarks/results").glob("performance.*")}
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    monkeypatch.setattr(performance, "overhead", lambda repeats, shape: [])
    monkeypatch.setattr(performance, "guided_step_cost", lambda repeats: [])
    monkeypatch.setattr(performance, "peak_memory", lambda counts: [])
    performance.main(["--quick"])
    (out,) = tmp_path.glob("kdpp-performance-quick-*")
    assert {p.name for p in out.iterdir()} == {"performance.json", "performance.md"}
    assert {p: p.stat().st_mtime_ns for p in committed} == committed


@pytest.mark.parametrize("script", ["train_learned", "train_toy_student"])
def test_training_scripts_never_overwrite_weights_unless_asked(script, tmp_path, monkeypatch):
    module = __import__(script)
    weights = tmp_path / "nets.pt"
    weights.write_bytes(b"shipped")
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        module.main(["--out", str(weights)])
    assert weights.read_bytes() == b"shipped"


def test_learned_training_defaults_to_a_fresh_temporary_folder(tmp_path, monkeypatch):
    import argparse

    import train_learned

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    out = train_learned.output_path(argparse.Namespace(out=None, overwrite=False))
    assert out.parent.parent == tmp_path and out.parent.name.startswith("kdpp-learned-train-")
    assert out.parent != train_learned.WEIGHTS.parent


#: the extra of setup.cfg that provides a module a benchmark imports
EXTRA_OF = {"k_diffusion": "k-diffusion", "diffusers": "diffusers", "peft": "diffusers", "matplotlib": "demo",
            "kdpp.learned": "learned", "kdpp.diffusers": "diffusers", "comfyui_env": "test", "comfy": "test"}


def _imports(path: Path) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_docs_list_the_extras_every_benchmark_needs():
    """docs/benchmarks.md has a row per script in benchmarks/, naming extras that exist in setup.cfg and cover the
    third-party packages the script imports (at the top or inside a function)."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    extras = set(cfg["options.extras_require"])
    documented = {}
    for line in (ROOT / "docs/benchmarks.md").read_text().splitlines():
        m = re.match(r"\| `benchmarks/(\w+)\.py` \| [^|]+ \| ([^|]+) \|", line)
        if m:
            documented[m.group(1)] = set(re.findall(r"`([a-z][\w-]*)`", m.group(2)))
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py") if not p.stem.startswith("_")}  # _: shared helpers
    assert set(documented) == scripts
    for script, named in documented.items():
        assert named <= extras, (script, named - extras)
        needed = {extra for module in _imports(ROOT / "benchmarks" / f"{script}.py") for prefix, extra in EXTRA_OF.items()
                  if module == prefix or module.startswith(prefix + ".")}
        assert needed <= named or "test" in named, (script, needed, named)  # the test extra has them all
