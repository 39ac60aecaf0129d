"""Distillation++ on trained nets: the paper's Tables 1-3 and a placement study on kdpp.learned's digits.

    python benchmarks/learned.py [--seeds 5] [--n 1000] [--smoke] [--out benchmarks/results] [--figure docs/img/learned_grid.png]

``--smoke`` writes into a new temporary folder unless ``--out`` is given (never into the source tree's
benchmarks/results by default).

Two settings, every student sampled with multistep consistency sampling (``sample_lcm_distpp``) on
the LCM-style trailing schedule (``timestep_sigmas(trailing_timesteps(N))``, sigma 14.6 -> 0):

- ``uncond``: the unconditional teacher (null label) correcting the unconditional ``strong`` and
  ``small`` students;
- ``cond``: the class-conditional teacher with CFG w = 4 correcting the students distilled at
  CFG w = 4 (``strong``, ``small``) and at w = 0.3 (``weakcfg``); 1000 samples, 100 per class.

Tables: (1) plain vs one teacher call on the first step (k = 1) with every renoising option;
(2) 4 + 1 vs 5 vs 5 + 1 vs 6 (N student steps + teacher calls), with network evaluations (NFE:
a CFG teacher call is 2) and wall time measured side by side; (3) lam sweeps, first step and
last step; (4) placement: one teacher call on the first, a middle or the last step, or on every
step, in the guidance form (paper eq. 10, which also works on the last step, where the default
renoising level ``next`` is 0 and would spend no teacher call).

Metrics (kdpp.learned.metrics): FD in the shipped classifier's features against all 1797 real
digits, requested-class accuracy, class-histogram TV. Each value is a mean over seeds with a
95% t-interval; each "minus plain" difference is taken per seed (same initial and solver noise:
paired) and is significant when its interval excludes 0. The FD floor is FD between two disjoint
random halves of the real digits.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kdpp
from kdpp.learned import (PROVENANCE, TEACHER_CFG, WEIGHTS, DigitsMetrics, conditioning, guided_teacher, load_digits, load_nets,
                          mean_ci, provenance, sample_teacher, to_images)
from kdpp.schedules import karras_sigmas, timestep_sigmas, trailing_timesteps

HERE = Path(__file__).resolve().parent
SETTINGS = {"uncond": ["strong", "small"], "cond": ["strong", "small", "weakcfg"]}
RENOISE = {  # Table 1: (renoise, renoise_sigma)
    "random/next (paper)": ("random", "next"),
    "deterministic/next": ("deterministic", "next"),
    "random/current": ("random", "current"),
    "random/random": ("random", "random"),
    "guidance (eq. 10)": ("guidance", None),
}


class Counted:
    """A net that counts its evaluations per sample (a CFG call on ``[uncond, cond]`` counts 2)."""

    def __init__(self, net, n: int):
        self.net, self.n, self.evals = net, n, 0

    def __call__(self, x, sigma, **kwargs):
        self.evals += x.shape[0] / self.n
        return self.net(x, sigma, **kwargs)


def placement(steps: list[int], lam: float) -> dict:
    """Sampler kwargs that guide ``steps`` (negative: from the end) with ``lam``."""
    return {"guided_steps": steps, "lam": lam}


def first_k(k: int, lam: float) -> dict:
    return {"k": k, "lam": lam}


class Bench:
    def __init__(self, nets, metrics, n: int, seeds: int):
        self.nets, self.metrics, self.n, self.seeds = nets, metrics, n, seeds

    def labels(self, mode):
        return torch.arange(self.n) % 10 if mode == "cond" else None

    def student_run(self, mode, student, steps, seed, guide=None, renoise=("random", "next")):
        """One seeded LCM run; returns (samples, metrics, student NFE, teacher NFE, seconds)."""
        labels = self.labels(mode)
        sargs, targs = conditioning(labels, TEACHER_CFG)
        s = Counted(self.nets[student], self.n)
        t = Counted(self.nets["teacher"], self.n)  # inside the CFG wrapper: one CFG call counts 2
        sigmas = timestep_sigmas(trailing_timesteps(steps))
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.n, 64, generator=g) * sigmas[0].item()
        guide = guide or first_k(0, 0.0)
        t0 = time.perf_counter()
        out = kdpp.sample_lcm_distpp(s, guided_teacher(t, labels), x, sigmas, extra_args=sargs, teacher_extra_args=targs, disable=True,
                                     noise_sampler=kdpp.seeded_noise_sampler(x, seed + 10_000),
                                     renoise=renoise[0], renoise_sigma=renoise[1], seed=seed + 20_000,
                                     **guide)
        seconds = time.perf_counter() - t0
        return out, self.metrics(out, labels), s.evals, t.evals, seconds

    def teacher_run(self, mode, steps, seed, schedule):
        labels = self.labels(mode)
        t0 = time.perf_counter()
        if schedule == "karras":
            out = sample_teacher(self.nets["teacher"], labels, steps=steps, seed=seed, n=self.n)
        else:
            sargs, targs = conditioning(labels, TEACHER_CFG)
            sigmas = timestep_sigmas(trailing_timesteps(steps))
            x = torch.randn(self.n, 64, generator=torch.Generator().manual_seed(seed)) * sigmas[0].item()
            out = kdpp.sample_dpmpp_2m_distpp(guided_teacher(self.nets["teacher"], labels), None, x, sigmas, 0.0, 0,
                                              extra_args=targs, disable=True)
        seconds = time.perf_counter() - t0
        nfe = steps * (2 if mode == "cond" else 1)
        return out, self.metrics(out, labels), 0.0, float(nfe), seconds

    def row(self, table, mode, who, label, run, baseline=None):
        """Run over seeds; summarise; add paired differences against ``baseline`` (a row)."""
        per_seed = [run(seed) for seed in range(self.seeds)]
        keys = per_seed[0][1].keys()
        r = {"table": table, "mode": mode, "who": who, "label": label,
             "values": {k: [p[1][k] for p in per_seed] for k in keys},
             "student_nfe": per_seed[0][2], "teacher_nfe": per_seed[0][3],
             "seconds": float(np.mean([p[4] for p in per_seed]))}
        r["mean"] = {k: list(mean_ci(v)) for k, v in r["values"].items()}
        if baseline is not None:
            r["vs"] = baseline["label"]
            r["diff"] = {k: list(mean_ci(np.subtract(v, baseline["values"][k]))) for k, v in r["values"].items()}
        if baseline is not None:
            r["time_ratio"] = r["seconds"] / baseline["seconds"]
        r["sample"] = per_seed[0][0][:20]
        return r


def fmt(e, digits=2):
    m, lo, hi = e
    return f"{m:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def fmt_diff(e, digits=2):
    m, lo, hi = e
    mark = "*" if lo > 0 or hi < 0 else ""
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def markdown(rows, floor, meta) -> str:
    out = [f"Command: `{meta['command']}`", "",
           f"{meta['seeds']} seeds x {meta['n']} samples; mean ± 95% t half-width over seeds; Δ = paired difference "
           f"against the row named in `vs` with its 95% interval (* = excludes 0). FD floor (real vs real, disjoint "
           f"halves): {fmt(floor)}. Nets: `{meta['weights_revision']}` (see kdpp/learned/provenance.json). "
           f"Teacher CFG w = {TEACHER_CFG} in `cond`. Machine: {meta['machine']}, torch {meta['torch']}, "
           f"{meta['threads']} thread(s). Time: mean wall time of one run of n samples, and its ratio to the "
           f"`vs` row's, measured in this run.", ""]
    for table in dict.fromkeys(r["table"] for r in rows):
        out += [f"### {table}", "", "| setting | net | sampler | NFE (S + T) | FD | ΔFD | acc | Δacc | TV | vs | time ms (x vs) |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["table"] == table):
            acc = fmt(r["mean"]["acc"], 3) if "acc" in r["mean"] else "-"
            dacc = fmt_diff(r["diff"]["acc"], 3) if "diff" in r and "acc" in r["diff"] else "-"
            dfd = fmt_diff(r["diff"]["fd"]) if "diff" in r else "-"
            ratio = f" ({r['time_ratio']:.2f}x)" if "time_ratio" in r else ""
            out.append(f"| {r['mode']} | {r['who']} | {r['label']} | {r['student_nfe']:.0f} + {r['teacher_nfe']:.0f} | "
                       f"{fmt(r['mean']['fd'])} | {dfd} | {acc} | {dacc} | {fmt(r['mean']['tv'], 3)} | "
                       f"{r.get('vs', '')} | {r['seconds'] * 1e3:.0f}{ratio} |")
        out.append("")
    return "\n".join(out)


def figure(rows, path):
    """Sample grids side by side: the first 20 samples of seed 0 of chosen rows (cond: digits 0-9 twice)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("cond", "weakcfg", "plain, 5 steps", "weakcfg (w = 0.3), 5 steps"),
        ("cond", "weakcfg", "5 + first step, lam 1.0", "weakcfg + first step, lam 1"),
        ("cond", "strong", "plain, 5 steps", "strong, 5 steps"),
        ("cond", "strong", "guidance, last step, lam 0.5", "strong + last step, lam 0.5"),
        ("uncond", "small", "plain, 5 steps", "small, 5 steps (uncond)"),
        ("uncond", "small", "guidance, last step, lam 1", "small + last step, lam 1 (uncond)"),
        ("cond", "teacher", "DPM++ 2M, 40 steps (Karras)", "teacher, 40 steps, CFG 4"),
    ]
    found = []
    for mode, who, label, title in panels:
        match = [r for r in rows if r["mode"] == mode and r["who"] == who and r["label"] == label]
        if match:
            found.append((title, match[0]))
    fig, axes = plt.subplots(1, len(found), figsize=(2.2 * len(found), 2.4))
    for ax, (title, r) in zip(np.atleast_1d(axes), found):
        imgs = torch.nn.functional.pad(to_images(r["sample"]), (0, 1, 0, 1))  # [20, 9, 9]: a 1-pixel gap
        grid = imgs.reshape(4, 5, 9, 9).permute(0, 2, 1, 3).reshape(36, 45)
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
        fd = r["mean"]["fd"][0]
        acc = f", acc {r['mean']['acc'][0]:.2f}" if "acc" in r["mean"] else ""
        ax.set_title(f"{title}\nFD {fd:.1f}{acc}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--smoke", action="store_true", help="a few rows, 2 seeds x 100 samples: checks the pipeline only")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--weights", default=str(WEIGHTS), help="the nets (provenance.json beside them)")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; with --smoke a new "
                   "temporary folder)")
    p.add_argument("--figure", default=None, help="PNG path for the sample grids")
    args = p.parse_args(argv)
    if args.smoke:
        args.seeds, args.n = 2, 100
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kdpp-learned-smoke-") if args.smoke else str(HERE / "results")
    torch.set_num_threads(args.threads)
    nets = load_nets(args.weights)
    real, real_labels = load_digits()
    metrics = DigitsMetrics(nets["classifier"], real, real_labels)
    bench = Bench(nets, metrics, args.n, args.seeds)
    floor = list(mean_ci([metrics.real_floor(real, seed) for seed in range(args.seeds)]))
    rows = []

    def add(*a, **kw):
        rows.append(bench.row(*a, **kw))
        r = rows[-1]
        d = f"  ΔFD {fmt_diff(r['diff']['fd'])}" if "diff" in r else ""
        print(f"{r['table'].split(':')[0]:9s} {r['mode']:6s} {r['who']:8s} {r['label']:42s} FD {fmt(r['mean']['fd'])}{d}"
              + (f"  acc {fmt(r['mean']['acc'], 3)}" if "acc" in r["mean"] else ""), flush=True)
        return r

    settings = {"cond": ["weakcfg"], "uncond": ["small"]} if args.smoke else SETTINGS
    t1, t2, t3, t4 = ("Table 1: first-step teacher call (k = 1, lam 0.5), renoising options",
                      "Table 2: 4+1 vs 5 vs 5+1 vs 6", "Table 3: lam sweep",
                      "Placement: where the one teacher call goes (guidance form)")
    for mode, students in settings.items():
        for steps, sched in ([(40, "karras")] if args.smoke else [(5, "trailing"), (5, "karras"), (40, "karras")]):
            label = f"DPM++ 2M, {steps} steps ({'Karras' if sched == 'karras' else 'trailing'})"
            add("Teacher alone", mode, "teacher", label,
                lambda seed, steps=steps, sched=sched: bench.teacher_run(mode, steps, seed, sched))
        for who in students:
            run = lambda seed, steps=5, **kw: bench.student_run(mode, who, steps, seed, **kw)
            plain = add(t1, mode, who, "plain, 5 steps", run)
            renoise = {"random/next (paper)": RENOISE["random/next (paper)"]} if args.smoke else RENOISE
            for name, rn in renoise.items():
                add(t1, mode, who, f"5 + first step, {name}", lambda seed, rn=rn: run(seed, guide=first_k(1, 0.5), renoise=rn),
                    baseline=plain)
            if not args.smoke:
                p4 = add(t2, mode, who, "plain, 4 steps", lambda seed: run(seed, steps=4))
                add(t2, mode, who, "4 + 1 (first step)", lambda seed: run(seed, steps=4, guide=first_k(1, 0.5)), baseline=p4)
                add(t2, mode, who, "plain, 5 steps", lambda seed: run(seed), baseline=p4)
                add(t2, mode, who, "5 + 1 (first step)", lambda seed: run(seed, guide=first_k(1, 0.5)), baseline=plain)
                add(t2, mode, who, "plain, 6 steps", lambda seed: run(seed, steps=6), baseline=plain)
                for lam in (0.1, 0.25, 0.5, 1.0):
                    add(t3, mode, who, f"5 + first step, lam {lam}", lambda seed, lam=lam: run(seed, guide=first_k(1, lam)),
                        baseline=plain)
                for lam in (0.25, 0.5, 1.0):
                    add(t3, mode, who, f"5 + last step (guidance), lam {lam}",
                        lambda seed, lam=lam: run(seed, guide=placement([-1], lam), renoise=("guidance", None)),
                        baseline=plain)
            where = {"first step": [0], "middle step": [2], "last step": [-1], "every step": [0, 1, 2, 3, 4]}
            if args.smoke:
                where = {"last step": [-1]}
            for lam in ([1.0] if args.smoke else (0.5, 1.0)):
                for name, steps_ in where.items():
                    add(t4, mode, who, f"guidance, {name}, lam {lam:g}",
                        lambda seed, s=steps_, lam=lam: run(seed, guide=placement(s, lam), renoise=("guidance", None)),
                        baseline=plain)
            if not args.smoke:
                add(t4, mode, who, "5 + teacher on first step, lam 0.5",
                    lambda seed: run(seed, guide=first_k(1, 0.5)), baseline=plain)

    prov = provenance(Path(args.weights).with_name(PROVENANCE.name))
    meta = {"command": "python benchmarks/learned.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seeds": args.seeds, "n": args.n, "threads": args.threads, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {platform.python_version()}",
            "weights_revision": prov["git_revision"], "floor_fd": floor}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "learned_smoke" if args.smoke else "learned"
    (out / f"{stem}.md").write_text(markdown(rows, floor, meta) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": [{k: v for k, v in r.items() if k != "sample"}
                                                                        for r in rows]}, indent=1) + "\n")
    if args.figure:
        figure(rows, args.figure)
    print(f"FD floor (real vs real): {fmt(floor)}; wrote {out / stem}.md/.json")
    return rows


if __name__ == "__main__":
    main()
