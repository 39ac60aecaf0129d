"""Distillation++ on trained nets: the paper's Tables 1-3, placement and the default, on kdpp.learned's digits.

    python benchmarks/learned.py [--seeds 5] [--n 1000] [--smoke] [--out benchmarks/results] [--figure PNG]

``--smoke`` (2 seeds x 100 samples, a few rows: checks the pipeline only) writes into a new temporary
folder unless ``--out`` is given (never into the source tree's benchmarks/results by default).

Two settings, every student sampled with multistep consistency sampling (``sample_lcm_distpp``) on
the LCM-style trailing schedule (``timestep_sigmas(trailing_timesteps(N))``, sigma 14.6 -> 0):

- ``uncond``: the unconditional teacher (null label) correcting the unconditional students;
- ``cond``: the class-conditional teacher with CFG w = 4 correcting the students distilled at w = 4
  and the one distilled at w = 0.3 (``weakcfg``); 1000 samples, 100 per class.

Students (``kdpp.learned.STUDENTS``): ``strong`` (converged, from scratch), ``teacher_init`` (converged,
initialised from the teacher), ``small`` (capacity-limited on purpose), ``weakcfg`` (converged at w = 0.3:
alignment headroom) and ``oracle`` (``TeacherODEStudent``: the teacher's own ODE endpoint, no training).

Tables: (0) plain students at 1..6 steps against the teacher; (1) one teacher call on the first step
with every renoising option; (2) 4 + 1 vs 5 vs 5 + 1 vs 6; (3) lam sweeps, first and last step; (4)
placement: one teacher call on the first, a middle or the last step, or on every step, in the guidance
form (paper eq. 10); (5) the summary, a view of rows of 1-4: every student x {plain, first-step calls (the
paper's among them), last-step calls, the recommended default}.

Every row's network evaluations and teacher calls are counted by wrappers around the nets (a CFG call is
one teacher call and 2 evaluations), never inferred from ``k``. Metrics (kdpp.learned.metrics): FD in the
shipped classifier's features against all 1797 real digits, requested-class accuracy, class-histogram TV.
Each value is a mean over seeds with a 95% t-interval; each difference is taken per seed (same initial,
solver and renoise noise: paired) and is significant (*) when its interval excludes 0; with fewer than 3
seeds no significance is claimed ("n/a"). The FD floor is FD between two disjoint random halves of the
real digits.
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

from kdpp.learned import (PROVENANCE, STUDENTS, TEACHER_CFG, WEIGHTS, CountedNet, DigitsMetrics, TeacherODEStudent,
                          load_digits, load_nets, mean_ci, provenance, sample_student, sample_teacher, to_images)

HERE = Path(__file__).resolve().parent
SETTINGS = {"uncond": ["strong", "teacher_init", "small", "oracle"],
            "cond": ["strong", "teacher_init", "small", "weakcfg", "oracle"]}
#: the main number of student steps
STEPS = 4
#: the fewest seeds a paired difference needs for a significance mark
MIN_SEEDS = 3
RENOISE = {  # Table 1: (renoise, renoise_sigma); None: the sampler's default level "auto"
    "random/auto": ("random", None),
    "deterministic/auto": ("deterministic", None),
    "random/current": ("random", "current"),
    "random/random": ("random", "random"),
    "guidance (eq. 10)": ("guidance", None),
}


def renoising(renoise: tuple[str, str | None]) -> dict:
    return {"renoise": renoise[0]} | ({} if renoise[1] is None else {"renoise_sigma": renoise[1]})


def first_k(k: int, lam: float, renoise=("random", None)) -> dict:
    """Sampler kwargs: the first ``k`` steps guided with ``lam``."""
    return {"k": k, "lam": lam} | renoising(renoise)


def placement(steps: list[int], lam: float, renoise=("guidance", None)) -> dict:
    """Sampler kwargs that guide ``steps`` (negative: from the end) with ``lam``."""
    return {"guided_steps": steps, "lam": lam} | renoising(renoise)


#: the teacher-call settings of the summary table (5), each run by one of the tables 1-4 (the summary is a view)
SUMMARY = {
    "first step, lam 0.1": first_k(1, 0.1),
    "first step, lam 0.25": first_k(1, 0.25),
    "first step, lam 0.5 (paper: k = 1, random, tau = next)": first_k(1, 0.5),
    "first step, lam 0.5, deterministic": first_k(1, 0.5, ("deterministic", None)),
    "first step, lam 1": first_k(1, 1.0),
    "last step, lam 0.1, guidance": placement([-1], 0.1),
    "last step, lam 0.25, guidance": placement([-1], 0.25),
    "last step, lam 0.5, guidance": placement([-1], 0.5),
    "last step, lam 0.5, random/auto": placement([-1], 0.5, ("random", None)),
}
#: the recommended default (a key of SUMMARY): see docs/learned.md for the evidence
RECOMMENDED = "first step, lam 0.1"
SUMMARY_TITLE = f"Summary: every student, {STEPS} steps, plain vs teacher calls (rows of the tables above)"


def run_key(mode: str, who: str, steps: int, guide: dict | None) -> tuple:
    """What identifies a student run (rows with equal keys are the same runs)."""
    return (mode, who, steps, json.dumps(guide, sort_keys=True))


def summary(rows: list[dict]) -> list[dict]:
    """The summary table (5): for every student, its plain run and each SUMMARY setting at STEPS steps, taken from
    the tables' rows (the same runs, differences against the same plain run)."""
    by_key = {r["key"]: r for r in rows if not r["table"].startswith("Summary")}
    out = []
    for mode, who in dict.fromkeys((r["mode"], r["who"]) for r in rows if r["who"] != "teacher"):
        for label, guide in {f"plain, {STEPS} steps": None, **SUMMARY}.items():
            row = by_key.get(repr(run_key(mode, who, STEPS, guide)))
            if row is not None:
                out.append(row | {"table": SUMMARY_TITLE, "label": label})
    return out


class Bench:
    def __init__(self, nets, metrics, n: int, seeds: int):
        self.nets, self.metrics, self.n, self.seeds = nets, metrics, n, seeds
        self.students = {name: nets[name] for name in STUDENTS if name in nets} | {"oracle": TeacherODEStudent(nets["teacher"])}
        self.cache: dict = {}

    def labels(self, mode):
        return torch.arange(self.n) % 10 if mode == "cond" else None

    def student_run(self, mode, who, steps, seed, guide=None):
        """One seeded LCM run; (samples, metrics, student evals, teacher evals, teacher calls, seconds)."""
        labels = self.labels(mode)
        s = CountedNet(self.students[who], self.n)
        t = CountedNet(self.nets["teacher"], self.n)  # inside the CFG wrapper: one CFG call is 2 evaluations
        t0 = time.perf_counter()
        out = sample_student(s, labels, steps, seed=seed, n=self.n, teacher=t if guide else None, **(guide or {}))
        seconds = time.perf_counter() - t0
        return out, self.metrics(out, labels), s.evals, t.evals, t.calls, seconds

    def teacher_run(self, mode, steps, seed, schedule):
        labels = self.labels(mode)
        t = CountedNet(self.nets["teacher"], self.n)
        t0 = time.perf_counter()
        out = sample_teacher(t, labels, steps=steps, seed=seed, n=self.n, schedule=schedule)
        seconds = time.perf_counter() - t0
        return out, self.metrics(out, labels), 0.0, t.evals, t.calls, seconds

    def runs(self, key, run):
        """Per-seed results of ``run(seed)``, computed once per ``key`` (tables share rows)."""
        if key not in self.cache:
            self.cache[key] = [run(seed) for seed in range(self.seeds)]
        return self.cache[key]

    def row(self, table, mode, who, label, key, run, baseline=None):
        """Run over seeds; summarise; add paired differences against ``baseline`` (a row)."""
        per_seed = self.runs(key, run)
        keys = per_seed[0][1].keys()
        counts = {(p[2], p[3], p[4]) for p in per_seed}
        assert len(counts) == 1, counts  # the same evaluations in every seed
        r = {"table": table, "mode": mode, "who": who, "label": label, "key": repr(key),
             "values": {k: [p[1][k] for p in per_seed] for k in keys},
             "student_nfe": per_seed[0][2], "teacher_nfe": per_seed[0][3], "teacher_calls": per_seed[0][4],
             "seconds": float(np.mean([p[5] for p in per_seed]))}
        r["mean"] = {k: list(mean_ci(v)) for k, v in r["values"].items()}
        if baseline is not None:
            r["vs"] = baseline["label"]
            r["diff"] = {k: list(mean_ci(np.subtract(v, baseline["values"][k]))) for k, v in r["values"].items()}
            r["time_ratio"] = r["seconds"] / baseline["seconds"]
        r["sample"] = per_seed[0][0][:20]
        return r


def fmt(e, digits=2):
    m, lo, hi = e
    if not np.isfinite(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {(hi - lo) / 2:.{digits}f}"


def fmt_diff(e, seeds, digits=2):
    m, lo, hi = e
    if seeds < MIN_SEEDS:
        return f"{m:+.{digits}f} (n/a)"
    mark = "*" if lo > 0 or hi < 0 else ""
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{mark}"


def markdown(rows, floor, meta) -> str:
    seeds = meta["seeds"]
    verdict = ("* = excludes 0" if seeds >= MIN_SEEDS else
               f"n/a: {seeds} seeds are too few for a significance claim (at least {MIN_SEEDS})")
    out = [f"Command: `{meta['command']}`", "",
           f"{seeds} seeds x {meta['n']} samples; mean ± 95% t half-width over seeds; Δ = paired difference "
           f"against the row named in `vs` with its 95% interval ({verdict}). FD floor (real vs real, disjoint "
           f"halves): {fmt(floor)}. Nets: `{meta['weights_revision']}` (see kdpp/learned/provenance.json). "
           f"Teacher CFG w = {TEACHER_CFG} in `cond`. NFE (S + T): network evaluations per sample of the student "
           f"and the teacher, and T calls the teacher's calls per run, all counted (a CFG call is 1 call, 2 "
           f"evaluations). Machine: {meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s). Time: "
           f"mean wall time of one run of n samples, and its ratio to the `vs` row's, measured in this run (the "
           f"oracle's student calls each run the teacher's ODE).", ""]
    for table in dict.fromkeys(r["table"] for r in rows):
        out += [f"### {table}", "", "| setting | net | sampler | NFE (S + T) | T calls | FD | ΔFD | acc | Δacc | TV | vs | "
                "time ms (x vs) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["table"] == table):
            acc = fmt(r["mean"]["acc"], 3) if "acc" in r["mean"] else "-"
            dacc = fmt_diff(r["diff"]["acc"], seeds, 3) if "diff" in r and "acc" in r["diff"] else "-"
            dfd = fmt_diff(r["diff"]["fd"], seeds) if "diff" in r else "-"
            ratio = f" ({r['time_ratio']:.2f}x)" if "time_ratio" in r else ""
            label = r["label"] + (" **(recommended)**" if r["table"].startswith("Summary")
                                  and r["label"] == meta.get("recommended") else "")
            out.append(f"| {r['mode']} | {r['who']} | {label} | {r['student_nfe']:.0f} + {r['teacher_nfe']:.0f} | "
                       f"{r['teacher_calls']} | {fmt(r['mean']['fd'])} | {dfd} | {acc} | {dacc} | "
                       f"{fmt(r['mean']['tv'], 3)} | {r.get('vs', '')} | {r['seconds'] * 1e3:.0f}{ratio} |")
        out.append("")
    return "\n".join(out)


def figure(rows, path):
    """Sample grids: the first 20 samples of seed 0 (the digits 0-9 twice) of every conditional student, plain, with
    the recommended call, the paper's first-step call and a guidance-form last-step call, and of the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cond = [r for r in summary(rows) if r["mode"] == "cond"]
    students = list(dict.fromkeys(r["who"] for r in cond))
    columns = {f"plain, {STEPS} steps": "plain", RECOMMENDED: f"{RECOMMENDED} (recommended)",
               "first step, lam 0.5 (paper: k = 1, random, tau = next)": "first step, lam 0.5 (paper)",
               "last step, lam 0.25, guidance": "last step, lam 0.25, guidance"}
    teachers = {f"DPM++ 2M, {n} steps ({sched})": title for n, sched, title in (
        (40, "Karras, sigma 80", "teacher, 40 steps"), (3, "trailing", "teacher, 3 steps (equal NFE)"),
        (STEPS, "trailing", f"teacher, {STEPS} steps"))}
    panels = [[(r, f"{who}, {title}") for label, title in columns.items() for r in cond
               if r["who"] == who and r["label"] == label] for who in students]
    panels.append([(r, title) for label, title in teachers.items() for r in rows
                   if r["mode"] == "cond" and r["who"] == "teacher" and r["label"] == label])
    fig, axes = plt.subplots(len(panels), len(columns), figsize=(2.6 * len(columns), 0.95 * len(panels)),
                             squeeze=False)
    for ax_row, row in zip(axes, panels):
        for ax in ax_row:
            ax.axis("off")
        for ax, (r, title) in zip(ax_row, row):
            imgs = torch.nn.functional.pad(to_images(r["sample"]), (0, 1, 0, 1))  # [20, 9, 9]: a 1-pixel gap
            grid = imgs.reshape(2, 10, 9, 9).permute(0, 2, 1, 3).reshape(18, 90)
            ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_title(f"{title}\nFD {r['mean']['fd'][0]:.1f}, acc {r['mean']['acc'][0]:.3f}", fontsize=6)
    fig.tight_layout(pad=0.3, h_pad=0.4)
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
    p.add_argument("--render", action="store_true", help="only re-render learned.md (its summary table from the "
                   "current SUMMARY and RECOMMENDED) from the learned.json in --out")
    args = p.parse_args(argv)
    if args.render:
        out = Path(args.out or HERE / "results")
        stored = json.loads((out / "learned.json").read_text())
        rows = [r for r in stored["rows"] if not r["table"].startswith("Summary")]
        stored["meta"]["recommended"] = RECOMMENDED
        (out / "learned.json").write_text(json.dumps(stored | {"rows": rows}, indent=1) + "\n")
        (out / "learned.md").write_text(markdown(rows + summary(rows), stored["meta"]["floor_fd"], stored["meta"]) + "\n")
        return rows
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
        d = f"  ΔFD {fmt_diff(r['diff']['fd'], args.seeds)}" if "diff" in r else ""
        print(f"{r['table'].split(':')[0]:9s} {r['mode']:6s} {r['who']:12s} {r['label']:44s} "
              f"{r['student_nfe']:.0f}+{r['teacher_nfe']:.0f} FD {fmt(r['mean']['fd'])}{d}"
              + (f"  acc {fmt(r['mean']['acc'], 3)}" if "acc" in r["mean"] else ""), flush=True)
        return r

    settings = {"cond": ["weakcfg"], "uncond": ["small"]} if args.smoke else SETTINGS
    t0, t1, t2, t3, t4 = ("Table 0: plain students at 1-6 steps, and the teacher",
                          f"Table 1: one teacher call (lam 0.5, {STEPS} steps), first or last step, renoising",
                          "Table 2: 4+1 vs 5 vs 5+1 vs 6", f"Table 3: lam sweep ({STEPS} steps)",
                          f"Placement: where the teacher call goes (guidance form, {STEPS} steps)")
    for mode, students in settings.items():
        teacher_rows = [(40, "karras")] if args.smoke else [(40, "karras")] + [(n, "trailing") for n in range(2, 7)]
        for steps, sched in teacher_rows:
            label = f"DPM++ 2M, {steps} steps ({'Karras, sigma 80' if sched == 'karras' else 'trailing'})"
            add(t0, mode, "teacher", label, (mode, "teacher", steps, sched),
                lambda seed, steps=steps, sched=sched: bench.teacher_run(mode, steps, seed, sched))
        for who in students:
            def run(steps=STEPS, guide=None, who=who, mode=mode):
                return run_key(mode, who, steps, guide), lambda seed: bench.student_run(mode, who, steps, seed, guide)

            plain = {}
            for steps in ([STEPS] if args.smoke else range(1, 7)):
                plain[steps] = add(t0, mode, who, f"plain, {steps} steps", *run(steps))
            base = plain[STEPS]
            renoise = {"random/auto": RENOISE["random/auto"]} if args.smoke else RENOISE
            for name, rn in renoise.items():
                add(t1, mode, who, f"first step, {name}", *run(guide=first_k(1, 0.5, rn)), baseline=base)
            for name, rn in ({} if args.smoke else RENOISE).items():
                add(t1, mode, who, f"last step, {name}", *run(guide=placement([-1], 0.5, rn)), baseline=base)
            if not args.smoke:
                add(t2, mode, who, "4 + first-step call, lam 0.5", *run(4, first_k(1, 0.5)), baseline=plain[4])
                add(t2, mode, who, "plain, 5 steps", *run(5), baseline=plain[4])
                add(t2, mode, who, "5 + first-step call, lam 0.5", *run(5, first_k(1, 0.5)), baseline=plain[5])
                add(t2, mode, who, "plain, 6 steps", *run(6), baseline=plain[5])
                add(t2, mode, who, "4 + last-step call, lam 0.5, guidance", *run(4, placement([-1], 0.5)),
                    baseline=plain[4])
                for lam in (0.1, 0.25, 0.5, 1.0):
                    add(t3, mode, who, f"first step, lam {lam:g}", *run(guide=first_k(1, lam)), baseline=base)
                for lam in (0.1, 0.25, 0.5, 1.0):
                    add(t3, mode, who, f"last step, lam {lam:g}, guidance", *run(guide=placement([-1], lam)),
                        baseline=base)
            where = {"first step": [0], "middle step": [STEPS // 2], "last step": [-1], "every step": list(range(STEPS))}
            if args.smoke:
                where = {"last step": [-1]}
            for lam in ([1.0] if args.smoke else (0.5, 1.0)):
                for name, steps_ in where.items():
                    add(t4, mode, who, f"{name}, lam {lam:g}", *run(guide=placement(steps_, lam)), baseline=base)

    prov = provenance(Path(args.weights).with_name(PROVENANCE.name))
    meta = {"command": "python benchmarks/learned.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "seeds": args.seeds, "n": args.n, "threads": args.threads, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {platform.python_version()}", "steps": STEPS,
            "recommended": RECOMMENDED, "weights_revision": prov["git_revision"], "floor_fd": floor}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "learned_smoke" if args.smoke else "learned"
    (out / f"{stem}.md").write_text(markdown(rows + summary(rows), floor, meta) + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": [{k: v for k, v in r.items() if k != "sample"}
                                                                        for r in rows]}, indent=1) + "\n")
    if args.figure:
        figure(rows, args.figure)
    print(f"FD floor (real vs real): {fmt(floor)}; wrote {out / stem}.md/.json")
    return rows


if __name__ == "__main__":
    main()
