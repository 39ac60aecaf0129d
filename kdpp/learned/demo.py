"""The digits demo (``python -m kdpp.demo``): Distillation++ on trained nets, in pictures, in about 10 s on 2 cores.

The class is the prompt. Every student of :mod:`kdpp.learned` samples the digits 0-9 with ``--steps``
multistep consistency steps, plain and with its teacher call (the CFG-4 teacher; one run per ``--lam``, by default
0.1, the documented default, and 0.5, the paper's scale; ``--k`` or ``--guided-steps``, ``--renoise``); the teacher alone runs at the student++ run's network evaluations
(counted: a CFG call is 2; DPM++ 2M on the students' schedule) and with 40 steps (DPM++ 2M, Karras
schedule from sigma 80). Runs of one seed share the initial and the solver noise
(paired). Each run is scored by FD and requested-class accuracy (:class:`kdpp.learned.DigitsMetrics`): the
mean over ``--seeds`` seeds with its 95 % t-interval, and for student++ the paired difference to the plain
student (no verdict with fewer than 3 seeds). The figure shows the first 20 samples of seed 0 of every run
(the digits 0-9, twice) with FD and accuracy in each title.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

import kdpp

from .data import to_images
from .metrics import DigitsMetrics, mean_ci
from .trained import STUDENTS, TEACHER_CFG, CountedNet, TeacherODEStudent, sample_student, sample_teacher

#: the teacher calls the demo shows unless told otherwise: the documented default (lam 0.1, the safest setting
#: measured, docs/learned.md) and the paper's scale (lam 0.5), both on the first step
DEFAULT_CALL = {"lam": [0.1, 0.5], "k": 1, "renoise": "random"}
#: the fewest seeds a paired difference needs for a verdict
MIN_SEEDS = 3
#: FD fits a 64-feature covariance; a few hundred samples per run keep it meaningful
MIN_N = 200
CHOICES = [*STUDENTS, "oracle"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=CHOICES,
                   help="which students (the 'oracle' runs the teacher's own ODE per step: slow)")
    p.add_argument("--steps", type=int, default=4, help="student steps N >= 1 (LCM trailing schedule)")
    p.add_argument("--lam", type=float, nargs="+", default=DEFAULT_CALL["lam"],
                   help="teacher guidance scales (finite), one student++ run each (default: 0.1 0.5)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--k", type=int, default=None, help=f"guide the first k steps (default {DEFAULT_CALL['k']})")
    where.add_argument("--guided-steps", type=int, nargs="+", default=None,
                       help="guide these steps instead (negative: from the end, -1 the last)")
    p.add_argument("--renoise", default=DEFAULT_CALL["renoise"], choices=["random", "deterministic", "guidance"],
                   help="the teacher call's renoising noise: random, deterministic (the student's own noise "
                        f"estimate) or guidance (the paper's eq. 10) (default: {DEFAULT_CALL['renoise']})")
    p.add_argument("--n", type=int, default=1000, help=f"samples per run, at least {MIN_N} (FD)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per run (paired intervals need 3 or more)")
    p.add_argument("--out", default="kdpp-demo-out", help="folder for digits.png and results.json")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figure (no matplotlib needed)")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.k is not None and not 0 <= args.k <= args.steps:
        p.error(f"--k must be between 0 and --steps ({args.steps}), got {args.k}")
    if args.guided_steps is not None and any(not -args.steps <= i < args.steps for i in args.guided_steps):
        p.error(f"--guided-steps must lie in -{args.steps} .. {args.steps - 1} (--steps {args.steps}), "
                f"got {args.guided_steps}")
    if not all(math.isfinite(lam) for lam in args.lam):
        p.error(f"--lam must be finite, got {args.lam}")
    if args.n < MIN_N:
        p.error(f"--n must be >= {MIN_N} (FD fits a 64-feature covariance), got {args.n}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")


def teacher_calls(args: argparse.Namespace) -> list[dict]:
    """The sampler options of the student++ runs, one per ``--lam``."""
    where = {"guided_steps": args.guided_steps} if args.guided_steps is not None else {
        "k": DEFAULT_CALL["k"] if args.k is None else args.k}
    return [{"lam": lam, "renoise": args.renoise, **where} for lam in args.lam]


def describe(call: dict) -> str:
    where = f"steps {call['guided_steps']}" if "guided_steps" in call else f"k={call['k']}"
    return f"{where}, lam {call['lam']:g}, renoise {call['renoise']}"


def summarise(values: list[float]) -> list[float]:
    return list(mean_ci(values))


def run(args: argparse.Namespace, nets: dict, metrics: DigitsMetrics) -> dict:
    """Every run over ``args.seeds`` seeds: per-seed FD and accuracy, summaries, paired differences, samples."""
    labels = torch.arange(args.n) % 10
    calls = teacher_calls(args)
    students = {name: (TeacherODEStudent(nets["teacher"]) if name == "oracle" else nets[name])
                for name in args.students}
    rows = []

    def measure(name: str, who: str, fn, baseline: dict | None = None) -> dict:
        per_seed, counts, seconds = [], None, 0.0
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            out, counts = fn(seed)
            seconds += time.perf_counter() - t0
            per_seed.append((out, metrics(out, labels)))
        row = {"run": name, "who": who, "student_evals": counts[0], "teacher_evals": counts[1],
               "seconds": seconds / args.seeds, "sample": per_seed[0][0][:20]}
        for key in ("fd", "acc"):
            row[key] = [m[key] for _, m in per_seed]
            row[f"{key}_ci"] = summarise(row[key])
            if baseline is not None:
                row[f"{key}_diff"] = summarise(np.subtract(row[key], baseline[key]))
        rows.append(row)
        return row

    def student_run(student, **distpp):
        def fn(seed):
            s, t = CountedNet(student, args.n), CountedNet(nets["teacher"], args.n)
            out = sample_student(s, labels, args.steps, seed=seed, teacher=t if distpp else None, **distpp)
            return out, (s.evals, t.evals)
        return fn

    def teacher_run(steps, schedule):
        def fn(seed):
            t = CountedNet(nets["teacher"], args.n)
            return sample_teacher(t, labels, steps=steps, seed=seed, schedule=schedule), (0.0, t.evals)
        return fn

    for name, student in students.items():
        plain = measure(f"{name}, {args.steps} steps", name, student_run(student))
        for call in calls:
            measure(f"{name} + teacher ({describe(call)})", name, student_run(student, **call), baseline=plain)
    pp = rows[-1]
    budget = pp["student_evals"] + pp["teacher_evals"]
    equal = 1
    while True:  # the most teacher steps within the budget, counted on one sample (the count does not depend on it)
        probe = CountedNet(nets["teacher"], 1)
        sample_teacher(probe, labels[:1], steps=equal + 1, schedule="trailing")
        if probe.evals > budget:
            break
        equal += 1
    measure(f"teacher, {equal} steps (equal NFE)", "teacher", teacher_run(equal, "trailing"))
    measure("teacher, 40 steps", "teacher", teacher_run(40, "karras"))
    return {"args": vars(args), "calls": calls, "rows": rows}


def fmt(ci: list[float], digits: int) -> str:
    m, lo, hi = ci
    if math.isnan(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def fmt_diff(ci: list[float], digits: int, seeds: int) -> str:
    m, lo, hi = ci
    if seeds < MIN_SEEDS:
        return f"{m:+.{digits}f} (n/a: {seeds} seed{'s' if seeds > 1 else ''})"
    verdict = "n.s." if lo <= 0 <= hi else "*"
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] {verdict}"


def table(result: dict) -> str:
    seeds = result["args"]["seeds"]
    width = max(len(r["run"]) for r in result["rows"]) + 1
    head = f"{'run':{width}} {'NFE S+T':>8} {'FD':>22} {'ΔFD vs plain':>26} {'accuracy':>24} {'Δacc vs plain':>28}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        dfd = fmt_diff(r["fd_diff"], 2, seeds) if "fd_diff" in r else "-"
        dacc = fmt_diff(r["acc_diff"], 3, seeds) if "acc_diff" in r else "-"
        lines.append(f"{r['run']:{width}} {r['student_evals']:>3.0f}+{r['teacher_evals']:<4.0f} {fmt(r['fd_ci'], 2):>22} "
                     f"{dfd:>26} {fmt(r['acc_ci'], 3):>24} {dacc:>28}")
    return "\n".join(lines)


def figure(result: dict, path: Path) -> Path:
    """One row per student (plain, then each teacher call) and one for the teacher; each panel the first 20 samples
    of seed 0 (the digits 0-9 twice), with FD, accuracy and NFE in its title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    who = list(dict.fromkeys(r["who"] for r in result["rows"]))
    panels = [[r for r in result["rows"] if r["who"] == w] for w in who]
    columns = max(len(row) for row in panels)
    fig, axes = plt.subplots(len(panels), columns, figsize=(2.9 * columns, 1.0 * len(panels) + 0.2), squeeze=False)
    for ax_row, row in zip(axes, panels):
        for ax in ax_row:
            ax.axis("off")
        for ax, r in zip(ax_row, row):
            imgs = torch.nn.functional.pad(to_images(r["sample"]), (0, 1, 0, 1))  # [20, 9, 9]: a 1-pixel gap
            grid = imgs.reshape(2, 10, 9, 9).permute(0, 2, 1, 3).reshape(18, 90)
            ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{r['run']}\nFD {r['fd_ci'][0]:.1f}, acc {r['acc_ci'][0]:.2f}, "
                         f"NFE {r['student_evals']:.0f}+{r['teacher_evals']:.0f}", fontsize=6)
    fig.suptitle("The class is the prompt: each panel shows the first 20 samples of seed 0, the requested "
                 "digits 0-9 twice (two rows of 0-9)", fontsize=7)
    fig.tight_layout(pad=0.3, h_pad=0.4)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    from .data import load_digits
    from .trained import load_nets

    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not args.no_figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("matplotlib is not installed: no figure this run (pip install 'kdpp[demo]' adds it; "
                  "--no-figures hides this note)")
            args.no_figures = True
    t0 = time.perf_counter()
    nets = load_nets()
    real, real_labels = load_digits()
    metrics = DigitsMetrics(nets["classifier"], real, real_labels)
    calls = teacher_calls(args)
    print(f"kdpp {kdpp.__version__} demo: the learned digits (kdpp.learned); class = prompt, CFG-{TEACHER_CFG:g} "
          f"teacher; students {', '.join(args.students)}; {args.steps} steps; teacher calls: "
          f"{'; '.join(describe(c) for c in calls)}; "
          f"{args.seeds} seed(s) x {args.n} samples")
    result = run(args, nets, metrics)
    print(table(result))
    print("FD: Frechet distance to the real digits in the digits classifier's features (lower is better); "
          "accuracy:\nhow often that classifier sees the requested digit. Mean [95% t-interval over seeds]; Δ: "
          "student++ minus\nthe plain student per seed (same noise: paired), * when its interval excludes 0. NFE "
          "S+T: network\nevaluations per sample, counted (a CFG teacher call is 2). The toy demo: python -m "
          "kdpp.demo --toy.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{k: v for k, v in r.items() if k != "sample"} for r in result["rows"]]
    (out / "results.json").write_text(json.dumps({"args": result["args"], "calls": result["calls"], "rows": rows},
                                                 indent=2))
    written = [out / "results.json"]
    if not args.no_figures:
        written.append(figure(result, out / "digits.png"))
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - t0:.0f} s")
    return 0
