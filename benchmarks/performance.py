"""Performance of kdpp's samplers, measured side by side in one run.

    python benchmarks/performance.py [--quick] [--out benchmarks/results]

``--quick`` writes into a new temporary folder unless ``--out`` is given (never over the committed results
by default).

1. Sampler overhead at lam = 0 against k-diffusion's samplers with a cheap denoiser
   (median and IQR of the per-repeat time ratios, interleaved repeats; target <= 1.02).
2. Cost of a guided step against a student step when student and teacher are the same
   network (target: one extra model call), and of the batched CFG teacher.
3. Peak memory against the number of steps (target: flat), each step count in a fresh process.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kdpp

HERE = Path(__file__).resolve().parent


def cheap_denoiser(x, sigma, **extra):
    """An elementwise VE denoiser of Gaussian data N(0.1, 0.5^2): the sampler's own work dominates."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.1 + 0.25 / (0.25 + s * s) * (x - 0.1)


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_iqr(values) -> tuple[float, list[float]]:
    """The median of ``values`` and their interquartile range ``[q1, q3]`` (nearest ranks), which contains it."""
    v = sorted(values)
    q = len(v) // 4
    return statistics.median(v), [v[q], v[-q - 1]]


def overhead(repeats: int, shape) -> list[dict]:
    from _kdiffusion import expose_kdiffusion_sampling

    expose_kdiffusion_sampling()  # also where k-diffusion came with --no-deps (the README's test environment)
    import k_diffusion.sampling as ks

    sigmas = kdpp.schedules.karras_sigmas(20, 0.03, 14.6).float()
    x = torch.randn(shape) * 14.6
    pairs = [
        ("euler", kdpp.sample_euler_distpp, ks.sample_euler),
        ("euler_ancestral", kdpp.sample_euler_ancestral_distpp, ks.sample_euler_ancestral),
        ("dpmpp_2s_ancestral", kdpp.sample_dpmpp_2s_ancestral_distpp, ks.sample_dpmpp_2s_ancestral),
        ("dpmpp_2m", kdpp.sample_dpmpp_2m_distpp, ks.sample_dpmpp_2m),
    ]
    rows = []
    for name, ours, theirs in pairs:
        a, b = [], []
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            a += timed(lambda: ours(cheap_denoiser, None, x, sigmas, 0.0, disable=True), 1)
            b += timed(lambda: theirs(cheap_denoiser, x, sigmas, disable=True), 1)
        # the statistic and its spread from the same numbers: the per-repeat (paired) ratios, not a ratio of medians
        ratio, iqr = median_iqr(ai / bi for ai, bi in zip(a, b))
        rows.append({"sampler": name, "kdpp_ms": 1e3 * statistics.median(a), "k_diffusion_ms": 1e3 * statistics.median(b),
                     "ratio": ratio, "ratio_iqr": iqr, "target": 1.02})
    return rows


class Net(torch.nn.Module):
    """A small conv net whose cost is the same whether it plays student or teacher."""

    def __init__(self, c=4, width=64):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c, width, 3, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(width, width, 3, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(width, c, 3, padding=1))

    def forward(self, x, sigma, **extra):
        s = sigma.reshape(-1, 1, 1, 1)
        return x / (1 + s * s) + 0.01 * self.body(x / (1 + s * s) ** 0.5)


def guided_step_cost(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(2, 4, 32, 32) * 14.6
    sigmas = torch.tensor([14.6, 4.1])  # one step, to a positive level: a guided step calls the teacher once
    cfg = kdpp.CFGDenoiser(lambda x, s, c: net(x, s) + 0 * c.mean(), 7.5)
    args = {"cond": {"c": torch.ones(2, 8)}, "uncond": {"c": torch.zeros(2, 8)}}
    cases = {
        "student step": lambda: kdpp.sample_euler_distpp(net, None, x, sigmas, 0.0, disable=True),
        "guided step (teacher = same net)": lambda: kdpp.sample_euler_distpp(net, net, x, sigmas, 1.0, 1, disable=True),
        "guided step (teacher with batched CFG)": lambda: kdpp.sample_euler_distpp(
            net, cfg, x, sigmas, 1.0, 1, extra_args={}, teacher_extra_args=args, disable=True),
        "one model call": lambda: net(x, torch.full((2,), 14.6)),
        "one batched CFG call": lambda: cfg(x, torch.full((2,), 14.6), **args),
    }
    with torch.no_grad():
        for fn in cases.values():
            fn()  # warm-up
        times = {name: [] for name in cases}
        for _ in range(repeats):
            for name, fn in cases.items():
                times[name] += timed(fn, 1)
    rows = []
    for name, t in times.items():
        # per repeat, in units of that repeat's single model call: the spread is the IQR of these ratios
        calls, iqr = median_iqr(a / b for a, b in zip(t, times["one model call"]))
        rows.append({"case": name, "ms": 1e3 * statistics.median(t), "model_calls": calls, "model_calls_iqr": iqr})
    return rows


def peak_memory_child(steps: int, sampler: str) -> None:
    x = torch.randn(4, 4, 256, 256) * 14.6  # 4 MiB per tensor
    sigmas = kdpp.schedules.karras_sigmas(steps, 0.03, 14.6)
    kdpp.SAMPLERS[sampler](cheap_denoiser, cheap_denoiser, x, sigmas, 0.5, steps, disable=True)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def peak_memory(step_counts) -> list[dict]:
    rows = []
    for sampler in ("euler_ancestral", "dpmpp_2m"):
        for n in step_counts:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), sampler], capture_output=True, text=True, check=True)
            rows.append({"sampler": sampler, "steps": n, "guided_steps": n, "peak_rss_mib": int(out.stdout.split()[-1]) / 1024})
    return rows


def markdown(result: dict) -> str:
    lines = [f"Command: `{result['command']}`  ", f"kdpp {result['kdpp']}, torch {result['torch']}, "
             f"{result['machine']}, {result['threads']} threads.", "",
             "**Sampler overhead at lam = 0 vs k-diffusion** (cheap elementwise denoiser, "
             f"x of shape {result['overhead_shape']}, 20 steps; times: medians of interleaved repeats; ratio: median of "
             "the per-repeat ratios kdpp / k-diffusion, with their IQR)", "",
             "| sampler | kdpp ms | k-diffusion ms | ratio | ratio IQR | target |", "|---|---|---|---|---|---|"]
    for r in result["overhead"]:
        lines.append(f"| {r['sampler']} | {r['kdpp_ms']:.2f} | {r['k_diffusion_ms']:.2f} | {r['ratio']:.3f} | "
                     f"{r['ratio_iqr'][0]:.3f}–{r['ratio_iqr'][1]:.3f} | ≤ {r['target']} |")
    lines += ["", "**Cost of a guided step** (student = teacher = the same small conv net; in model calls)", "",
              "| case | ms | model calls | IQR |", "|---|---|---|---|"]
    for r in result["guided"]:
        lo, hi = r["model_calls_iqr"]
        lines.append(f"| {r['case']} | {r['ms']:.2f} | {r['model_calls']:.2f} | {lo:.2f}–{hi:.2f} |")
    lines += ["", "**Peak memory vs steps** (every step guided; x = 4 MiB; peak RSS of a fresh process)", "",
              "| sampler | steps | peak RSS MiB |", "|---|---|---|"]
    for r in result["memory"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        peak_memory_child(int(sys.argv[2]), sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke test)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; with --quick a new "
                   "temporary folder)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kdpp-performance-quick-") if args.quick else str(HERE / "results")
    torch.set_num_threads(1)
    repeats = 5 if args.quick else 41
    shape = (8, 4, 64, 64)
    result = {
        "command": "python benchmarks/performance.py" + (" --quick" if args.quick else ""),
        "kdpp": kdpp.__version__, "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(), "overhead_shape": list(shape),
        "overhead": overhead(repeats, shape),
        "guided": guided_step_cost(repeats),
        "memory": peak_memory([4, 16, 64] if args.quick else [4, 16, 64, 256]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "performance.json").write_text(json.dumps(result, indent=2))
    (out / "performance.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'performance.json'} and {out / 'performance.md'}")


if __name__ == "__main__":
    main()
