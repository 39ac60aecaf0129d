"""The paper's claims, tested on problems whose truth is exact (kdpp.toy).

    python benchmarks/claims.py [--seeds 5] [--n 1000] [--quick] [--out benchmarks/results] [--figures docs/img]

``--quick`` writes its results and figures into a new temporary folder unless ``--out`` / ``--figures``
are given (never over the committed results by default).

Every number is a mean over seeds with its 95% t-interval over seeds, written and
stored as ``[low, high]``; every run is scored against one fixed reference sample
of the truth, and a difference "++ minus plain" is computed per seed (same initial
and solver noise and the same reference: paired) and called significant when its
interval excludes 0; with fewer than 3 seeds no verdict is given ("n/a"). Teacher calls are counted by a
wrapper around the teacher (batched model calls per run), never inferred from ``k``. Tables:

1. every solver x every toy student, plain vs ++ (k = 1), on a 2-D ring and a d = 16 mixture;
2. 4 student steps + 1 teacher step vs 5 vs 5 + 1 vs 6 student steps (metric and wall time);
3. renoising level next / current / random x renoising noise random / deterministic, and the
   guidance form (paper eq. 10);
4. lam and k sweeps (figures);
5. a sharp toy on which the teacher itself is poor at few steps: does student++ beat both
   the student and the teacher at equal NFE?
6. DPM++ 2M history: unrefined (docs/method.md) vs refined, with several guided steps.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

import kdpp
from kdpp.demo import CallCounter
from kdpp.noise import initial_noise
from kdpp.schedules import timestep_sigmas, trailing_timesteps
from kdpp.toy import FlowMapStudent, grid, high_dim, mode_coverage, nll, ring, sliced_wasserstein
from kdpp.toy.trained import load_trained_student

HERE = Path(__file__).resolve().parent
SOLVERS = ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"]
METRICS = ("sw", "mode_tv", "nll")


def students_for(truth, name):
    out = {
        "weights": FlowMapStudent(truth.shifted(weights=torch.linspace(1.0, 4.0, truth.K))),
        "wide": FlowMapStudent(truth.shifted(std_scale=1.8)),
        "truncated": FlowMapStudent(truth, steps=2),
    }
    if name == "ring":
        out["trained"] = load_trained_student()
    return out


def sample(truth, student, teacher, solver, steps, lam, k, seed, n, **options):
    """One run; ``seed`` draws its initial, solver and renoise noise (runs of one seed are paired). Returns the
    samples, the wall time and the teacher's counted calls."""
    sigmas = timestep_sigmas(trailing_timesteps(steps))
    x = initial_noise(seed, (n, truth.d), torch.float64) * sigmas[0]
    counted = None if teacher is None else CallCounter(teacher)
    t0 = time.perf_counter()
    out = kdpp.SAMPLERS[solver](student, counted, x, sigmas, lam, k, seed=seed, disable=True, **options)
    return out, time.perf_counter() - t0, 0 if counted is None else counted.calls


def score(out, truth, reference) -> dict:
    return {"sw": sliced_wasserstein(out, reference, n_boot=0).value,
            "mode_tv": mode_coverage(out, truth, n_boot=0).value,
            "nll": nll(out, truth, n_boot=0).value}


def interval(values) -> dict:
    """Mean over seeds and its 95% t-interval ``[low, high]``."""
    v = np.asarray(values, dtype=float)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "low": float(v.mean() - half), "high": float(v.mean() + half), "seeds": len(v)}


def fmt(ci: dict) -> str:
    return f"{ci['mean']:.3f} [{ci['low']:.3f}, {ci['high']:.3f}]"


#: the fewest seeds a paired difference needs for a verdict (2 seeds: a t-interval with 1 degree of freedom)
MIN_SEEDS = 3


def verdict(diff: dict) -> str:
    if diff.get("seeds", MIN_SEEDS) < MIN_SEEDS:
        return "n/a"
    return "better" if diff["high"] < 0 else "worse" if diff["low"] > 0 else "n.s."


def fmt_diff(diff: dict) -> str:
    """A paired difference, its interval and the verdict."""
    return f"{diff['mean']:+.3f} [{diff['low']:+.3f}, {diff['high']:+.3f}] ({verdict(diff)})"


class Bench:
    def __init__(self, seeds, n):
        self.seeds, self.n = seeds, n
        self.references = {}

    def reference(self, name, truth):
        if name not in self.references:
            self.references[name] = truth.sample(self.n, torch.Generator().manual_seed(123))
        return self.references[name]

    def evaluate(self, name, truth, student, teacher, solver, steps, lam, k, **options) -> dict:
        """Per-seed metrics and seconds of one configuration."""
        per_seed = []
        for seed in range(self.seeds):
            out, seconds, calls = sample(truth, student, teacher, solver, steps, lam, k, seed, self.n, **options)
            per_seed.append({**score(out, truth, self.reference(name, truth)), "seconds": seconds,
                             "teacher_calls": calls})
        return {key: [r[key] for r in per_seed] for key in per_seed[0]}

    @staticmethod
    def summary(res: dict) -> dict:
        """Mean and interval of every metric and the time; the teacher's counted calls per run (the same for
        every seed)."""
        calls = set(res["teacher_calls"])
        assert len(calls) == 1, calls
        return {key: interval(v) for key, v in res.items() if key != "teacher_calls"} | {"teacher_calls": calls.pop()}

    @staticmethod
    def paired(a: dict, b: dict) -> dict:
        """b - a per seed, per metric."""
        return {m: interval(np.subtract(b[m], a[m])) for m in METRICS}


def table1(bench: Bench, quick: bool) -> list[dict]:
    rows = []
    dists = {"ring": ring(), "high_dim16": high_dim(16)}
    for dname, truth in dists.items():
        for sname, student in students_for(truth, dname).items():
            for solver in (SOLVERS[:1] + SOLVERS[-1:] if quick else SOLVERS):
                plain = bench.evaluate(dname, truth, student, None, solver, 4, 0.0, 0)
                guided = bench.evaluate(dname, truth, student, truth.denoiser, solver, 4, 1.0, 1)
                rows.append({"distribution": dname, "student": sname, "solver": solver,
                             "teacher_calls": bench.summary(guided)["teacher_calls"],
                             "plain": bench.summary(plain), "guided": bench.summary(guided),
                             "diff": bench.paired(plain, guided)})
    return rows


def table2(bench: Bench) -> list[dict]:
    truth = ring()
    student = students_for(truth, "ring")["weights"]
    rows = []
    for solver in ("euler", "lcm"):
        for steps, k in ((4, 1), (5, 0), (5, 1), (6, 0)):
            res = bench.evaluate("ring", truth, student, truth.denoiser if k else None, solver, steps, 1.0 if k else 0.0, k)
            summary = bench.summary(res)
            rows.append({"solver": solver, "config": f"{steps} + {summary['teacher_calls']}", "student_steps": steps,
                         **summary})
    return rows


def table3(bench: Bench) -> list[dict]:
    truth = ring()
    rows = []
    for solver, sname in (("euler", "weights"), ("lcm", "trained")):
        student = students_for(truth, "ring")[sname]
        base = bench.evaluate("ring", truth, student, None, solver, 4, 0.0, 0)
        configs = [(f"{noise} noise, tau = {level}", {"renoise": noise, "renoise_sigma": level})
                   for noise in ("random", "deterministic") for level in ("next", "current", "random")]
        configs.append(("guidance form (eq. 10)", {"renoise": "guidance"}))
        for label, options in configs:
            res = bench.evaluate("ring", truth, student, truth.denoiser, solver, 4, 1.0, 1, **options)
            rows.append({"solver": solver, "student": sname, "config": label, **bench.summary(res),
                         "diff": bench.paired(base, res)})
    return rows


def sweeps(bench: Bench, figures: Path, quick: bool) -> dict:
    truth = ring()
    student = students_for(truth, "ring")["weights"]
    lams = [0.0, 0.5, 1.0] if quick else [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    ks = [0, 1, 2] if quick else [0, 1, 2, 3, 4]
    lam_rows = [{"lam": lam, **bench.summary(bench.evaluate("ring", truth, student, truth.denoiser, "euler", 4, lam, 1))}
                for lam in lams]
    k_rows = [{"k": k, **bench.summary(bench.evaluate("ring", truth, student, truth.denoiser, "euler", 4, 1.0, k))}
              for k in ks]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, rows, fname in (("lam", lam_rows, "sweep_lam.png"), ("k", k_rows, "sweep_k.png")):
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
        for ax, m in zip(axes, METRICS):
            xs = [r[key] for r in rows]
            if key == "k":
                ax.set_xticks(xs, [f"{r['k']}\n({r['teacher_calls']} calls)" for r in rows], fontsize=7)
            means = np.array([r[m]["mean"] for r in rows])
            bounds = np.array([[r[m]["low"], r[m]["high"]] for r in rows]).T
            ax.errorbar(xs, means, yerr=np.abs(bounds - means), marker="o", capsize=3)
            ax.set_xlabel(key)
            ax.set_title({"sw": "sliced W2", "mode_tv": "mode-mass TV", "nll": "NLL"}[m])
        fig.suptitle(f"Euler, 4 steps, ring, 'weights' student: {key} sweep ({'k = 1' if key == 'lam' else 'lam = 1'})", fontsize=10)
        fig.tight_layout()
        fig.savefig(figures / fname, dpi=100)
        plt.close(fig)
    return {"lam": lam_rows, "k": k_rows}


def poor_teacher(bench: Bench) -> list[dict]:
    """Sharp modes: few-step sampling of the exact teacher smears between them."""
    truth = grid(side=4, spacing=2.5, std=0.05)
    student = FlowMapStudent(truth.shifted(weights=torch.linspace(1.0, 4.0, truth.K)))
    rows = []
    for label, model, teacher, steps, lam, k in (
        ("student, 4 steps", student, None, 4, 0.0, 0),
        ("student, 5 steps", student, None, 5, 0.0, 0),
        ("student++, 4 steps + {calls} teacher call(s)", student, truth.denoiser, 4, 1.0, 1),
        ("teacher, 5 steps (equal NFE)", truth.denoiser, None, 5, 0.0, 0),
    ):
        res = bench.evaluate("grid_sharp", truth, model, teacher, "euler", steps, lam, k)
        summary = bench.summary(res)
        rows.append({"config": label.format(calls=summary["teacher_calls"]), **summary, "per_seed": res})
    guided = rows[2]["per_seed"]
    for row in rows:
        row["diff_vs_student++"] = bench.paired(guided, row.pop("per_seed"))
    return rows


def history(bench: Bench) -> list[dict]:
    truth = ring()
    student = students_for(truth, "ring")["wide"]
    rows = []
    for k in (1, 2, 4):
        a = bench.evaluate("ring", truth, student, truth.denoiser, "dpmpp_2m", 4, 0.7, k, history="student")
        b = bench.evaluate("ring", truth, student, truth.denoiser, "dpmpp_2m", 4, 0.7, k, history="refined")
        rows.append({"k": k, "student": bench.summary(a), "refined": bench.summary(b), "diff": bench.paired(a, b)})
    return rows


def markdown(r: dict) -> str:
    L = [f"Command: `{r['command']}`  ", f"kdpp {r['kdpp']}, torch {r['torch']}, {r['machine']}; "
         f"{r['seeds']} seeds x {r['n']} samples per configuration; {r['seconds']:.0f} s in all.", "",
         "Metrics (lower is better): **SW** sliced 2-Wasserstein to a reference sample of the truth, **TV** "
         "total variation between mass per mode and the true weights, **NLL** mean negative log-likelihood under "
         "the truth (below the truth's own value means too concentrated). Mean over seeds [95% t-interval over "
         "seeds]; every run is scored against one fixed reference sample of the truth; Δ = ++ minus plain per seed "
         "(paired: same noise, same reference) with its interval; *better*/*worse* when Δ's interval excludes 0.", "",
         "Teacher calls: counted per run (a two-stage solver's guided step corrects both stages).", "",
         "### Table 1 analogue: one teacher-guided step (k = 1, lam = 1, random renoise, 4 steps)", "",
         "| data | student | solver | teacher calls | SW plain | SW ++ | ΔSW | TV plain | TV ++ | ΔTV | NLL plain | "
         "NLL ++ | ΔNLL |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["table1"]:
        cells = []
        for m in METRICS:
            cells += [fmt(row["plain"][m]), fmt(row["guided"][m]), fmt_diff(row["diff"][m])]
        L.append(f"| {row['distribution']} | {row['student']} | {row['solver']} | {row['teacher_calls']} | "
                 + " | ".join(cells) + " |")
    L += ["", "### Table 2 analogue: 4 + 1 vs 5 vs 5 + 1 vs 6 steps (ring, 'weights' student, lam = 1)", "",
          "| solver | student steps + teacher calls | SW | TV | NLL | wall time s |", "|---|---|---|---|---|---|"]
    for row in r["table2"]:
        L.append(f"| {row['solver']} | {row['config']} | {fmt(row['sw'])} | {fmt(row['mode_tv'])} | {fmt(row['nll'])} | "
                 f"{fmt(row['seconds'])} |")
    L += ["", "### Table 3 analogue: renoising (4 steps, k = 1, lam = 1; Δ against the plain student)", "",
          "| solver | student | renoising | teacher calls | SW | ΔSW | TV | ΔTV | NLL | ΔNLL |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for row in r["table3"]:
        cells = []
        for m in METRICS:
            cells += [fmt(row[m]), fmt_diff(row["diff"][m])]
        L.append(f"| {row['solver']} | {row['student']} | {row['config']} | {row['teacher_calls']} | "
                 + " | ".join(cells) + " |")
    L += ["", "### lam and k sweeps (Euler, 4 steps, ring, 'weights' student)", "",
          "Figures: `docs/img/sweep_lam.png`, `docs/img/sweep_k.png` (shown on the Benchmarks page).", "",
          "| lam (k = 1) | teacher calls | SW | TV | NLL |", "|---|---|---|---|---|"]
    for row in r["sweeps"]["lam"]:
        L.append(f"| {row['lam']} | {row['teacher_calls']} | {fmt(row['sw'])} | {fmt(row['mode_tv'])} | "
                 f"{fmt(row['nll'])} |")
    L += ["", "| k (lam = 1) | teacher calls | SW | TV | NLL |", "|---|---|---|---|---|"]
    for row in r["sweeps"]["k"]:
        L.append(f"| {row['k']} | {row['teacher_calls']} | {fmt(row['sw'])} | {fmt(row['mode_tv'])} | "
                 f"{fmt(row['nll'])} |")
    L += ["", "### A teacher that is poor at few steps (4x4 grid, mode std 0.05, Euler)", "",
          "| run | SW | TV | NLL | ΔSW vs student++ | ΔTV vs student++ | ΔNLL vs student++ |", "|---|---|---|---|---|---|---|"]
    for row in r["poor_teacher"]:
        d = row["diff_vs_student++"]
        L.append(f"| {row['config']} | {fmt(row['sw'])} | {fmt(row['mode_tv'])} | {fmt(row['nll'])} | "
                 + " | ".join(fmt_diff(d[m]) for m in METRICS) + " |")
    L += ["", "### DPM++ 2M history with several guided steps (ring, 'wide' student, lam = 0.7)", "",
          "| k | teacher calls | NLL, history = student | NLL, history = refined | ΔNLL (refined − student) | ΔSW |",
          "|---|---|---|---|---|---|"]
    for row in r["history"]:
        d = row["diff"]
        L.append(f"| {row['k']} | {row['refined']['teacher_calls']} | {fmt(row['student']['nll'])} | {fmt(row['refined']['nll'])} | "
                 f"{fmt_diff(d['nll'])} | {fmt_diff(d['sw'])} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n", type=int, default=1000, help="samples per run")
    p.add_argument("--quick", action="store_true", help="a smoke test: 2 seeds, 200 samples, fewer cells")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results; with --quick a new "
                   "temporary folder)")
    p.add_argument("--figures", default=None, help="folder for the sweep figures (default: docs/img; with --quick "
                   "the results folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--render", action="store_true", help="only re-render claims.md from an existing claims.json")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kdpp-claims-quick-") if args.quick else str(HERE / "results")
    if args.figures is None:
        args.figures = args.out if args.quick else str(HERE.parent / "docs" / "img")
    out = Path(args.out)
    if args.render:
        result = json.loads((out / "claims.json").read_text())
        (out / "claims.md").write_text(markdown(result))
        return result
    if args.quick:
        args.seeds, args.n = 2, 200
    torch.set_num_threads(args.threads)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    bench = Bench(args.seeds, args.n)
    t0 = time.perf_counter()
    result = {
        "command": "python benchmarks/claims.py" + (" --quick" if args.quick else f" --seeds {args.seeds} --n {args.n}")
                   + (f" --threads {args.threads}" if args.threads != 1 else ""),
        "kdpp": kdpp.__version__, "torch": torch.__version__, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "seeds": args.seeds, "n": args.n,
        "table1": table1(bench, args.quick), "table2": table2(bench), "table3": table3(bench),
        "sweeps": sweeps(bench, Path(args.figures), args.quick), "poor_teacher": poor_teacher(bench), "history": history(bench),
    }
    result["seconds"] = time.perf_counter() - t0
    (out / "claims.json").write_text(json.dumps(result, indent=1))
    (out / "claims.md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out / 'claims.json'}, {out / 'claims.md'} and the sweep figures in {args.figures}")
    return result


if __name__ == "__main__":
    main()
