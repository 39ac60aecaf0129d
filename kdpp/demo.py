"""``python -m kdpp.demo``: Distillation++ in pictures, in seconds on a CPU.

By default, the learned digits (:mod:`kdpp.learned.demo`; needs scikit-learn and matplotlib:
``pip install 'kdpp[demo]'``): trained and distilled nets, the class as the prompt, every student plain,
with its teacher call, and the teacher alone at equal cost, as image grids with FD and accuracy.

``--toy``: the analytic toy problem. A fast student (an imperfect endpoint predictor of a 2-D Gaussian mixture) is
sampled with ``N`` steps, with ``N + 1`` steps, and with ``N`` steps of which the
first ``k`` are corrected by the exact teacher ("student++"); the teacher alone
runs at the student++ run's number of model calls (counted) and with many steps.
Every run starts from the same initial noise and gets the same solver noise (a
fresh noise sampler from one seed per run), so the runs are paired. Every run is scored
against the exact distribution (metric [95% bootstrap interval]; sliced W2 also
as a paired difference to the N-step student against the same reference
sample, for the runs at about the student's cost) and the figures are written to ``--out`` (skipped, with a note, when
matplotlib is missing: ``pip install 'kdpp[demo]'`` adds it).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import kdpp
from kdpp.schedules import karras_sigmas, timestep_sigmas, trailing_timesteps
from kdpp.toy import DISTRIBUTIONS, FlowMapStudent, mode_coverage, nll, paired_difference, sliced_wasserstein

STUDENTS = {
    "weights": "exact flow map of the mixture with the wrong mode weights (distribution shift)",
    "wide": "exact flow map of the mixture with 1.8x too wide modes (distribution shift)",
    "truncated": "the teacher's flow map truncated to 2 Euler steps (imperfect distillation)",
    "trained": "a small MLP distilled from the teacher by consistency distillation (ring only)",
}


def make_student(kind: str, truth):
    if kind == "weights":
        return FlowMapStudent(truth.shifted(weights=torch.linspace(1.0, 4.0, truth.K)))
    if kind == "wide":
        return FlowMapStudent(truth.shifted(std_scale=1.8))
    if kind == "truncated":
        return FlowMapStudent(truth, steps=2)
    if kind == "trained":
        from kdpp.toy.trained import load_trained_student

        return load_trained_student()
    raise ValueError(f"student must be one of {sorted(STUDENTS)}, got {kind!r}")


#: smallest --n: the percentile bootstrap intervals and the mode-mass TV need several samples per mode
#: (about 12 per mode of the 8-mode ring, 6 per mode of the 16-mode grid); with fewer (n = 1: zero-width
#: intervals) the table's intervals mean nothing
MIN_N = 100
#: fewest bootstrap resamples --boot accepts (fewer give intervals that mean nothing)
MIN_BOOT = 20


def parse_args(argv=None) -> argparse.Namespace:
    """The digits demo's options, or with ``--toy`` the toy demo's (:func:`parse_toy_args`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--toy" in argv:
        return parse_toy_args(argv)
    from .learned import demo as digits

    p = argparse.ArgumentParser(prog="python -m kdpp.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", help="the analytic toy demo instead (its options: python -m "
                   "kdpp.demo --toy --help)")
    digits.add_arguments(p)
    args, unknown = p.parse_known_args(argv)
    toy_only = {a.split("=")[0] for a in unknown} & TOY_OPTIONS
    if toy_only:
        p.error(f"{', '.join(sorted(toy_only))}: an option of the toy demo; add --toy")
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    digits.check_args(p, args)
    return args


#: the options only the toy demo has
TOY_OPTIONS = {"--solver", "--student", "--distribution", "--seed"}


def parse_toy_args(argv=None) -> argparse.Namespace:
    """The toy demo's options (``--toy`` is accepted and implied)."""
    p = argparse.ArgumentParser(prog="python -m kdpp.demo --toy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--toy", action="store_true", default=True, help="the analytic toy demo (this one)")
    p.add_argument("--solver", default="euler", choices=[s for s in kdpp.SAMPLERS if "cfg_pp" not in s])
    p.add_argument("--student", default="weights", choices=sorted(STUDENTS))
    p.add_argument("--distribution", default="ring", choices=sorted(DISTRIBUTIONS))
    p.add_argument("--steps", type=int, default=4, help="student steps N >= 1 (SD-style trailing timesteps)")
    p.add_argument("--lam", type=float, default=1.0, help="teacher guidance scale (finite)")
    p.add_argument("--k", type=int, default=1, help="number of teacher-guided steps, 0 to --steps")
    p.add_argument("--renoise", default="random", choices=["random", "deterministic", "guidance"],
                   help="renoising of the teacher call: fresh noise, the student's own noise estimate, or the guidance form "
                        "(default: random)")
    p.add_argument("--n", type=int, default=2000, help=f"samples per run, at least {MIN_N} (for the bootstrap "
                   "intervals and the mode-mass TV)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--boot", type=int, default=None, help=f"bootstrap resamples per interval, at least {MIN_BOOT} "
                   "(default: each metric's own, 100 for sliced W2, 200 for NLL and mode-mass TV; fewer is faster "
                   "and coarser)")
    p.add_argument("--out", default="kdpp-demo-out", help="folder for the figures and results.json")
    p.add_argument("--no-figures", action="store_true", help="skip the PNG figures (no matplotlib needed)")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.k <= args.steps:
        p.error(f"--k must be between 0 and --steps ({args.steps}), got {args.k}")
    if not math.isfinite(args.lam):
        p.error(f"--lam must be finite, got {args.lam}")
    if args.boot is not None and args.boot < MIN_BOOT:
        p.error(f"--boot must be >= {MIN_BOOT} (or left out), got {args.boot}")
    if args.n < MIN_N:
        p.error(f"--n must be >= {MIN_N} (the bootstrap intervals and the mode-mass TV need several samples "
                f"per mode), got {args.n}")
    return args


class CallCounter:
    """A denoiser that counts its calls (one call: one batched model evaluation, the demo's NFE)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.denoiser(*args, **kwargs)


def run(args: argparse.Namespace) -> dict:
    boot = {} if args.boot is None else {"n_boot": args.boot}
    torch.manual_seed(args.seed)
    truth = DISTRIBUTIONS[args.distribution]()
    student = make_student(args.student, truth)
    sampler = kdpp.SAMPLERS[args.solver]
    teacher_sampler = kdpp.SAMPLERS["euler" if args.solver == "lcm" else args.solver]
    g = torch.Generator().manual_seed(args.seed)
    reference = truth.sample(args.n, g)
    sigmas = timestep_sigmas(trailing_timesteps(args.steps))
    x = torch.randn(args.n, truth.d, generator=g, dtype=torch.float64) * sigmas[0]

    def noise(like: torch.Tensor) -> dict:
        """A fresh solver noise sampler from the same seed for every run, so the runs are paired in their noise."""
        return {} if args.solver == "dpmpp_2m" else {"noise_sampler": kdpp.seeded_noise_sampler(like, args.seed + 1)}

    def teacher_run(steps: int, like: torch.Tensor, teacher) -> torch.Tensor:
        return teacher_sampler(teacher, None, like, timestep_sigmas(trailing_timesteps(steps)), 0.0, disable=True,
                               **noise(like))

    trajectories: dict[str, list[dict]] = {"student": [], "student++": []}

    def keep(name):
        return lambda d: trajectories[name].append(
            {key: d[key][:16].clone() for key in ("x", "denoised", "student_denoised")})

    rows, samples = [], {"truth": reference}

    def measure(name: str, fn) -> None:
        """Run ``fn(student, teacher)`` with call-counting models; record its sample, real NFE, time and metrics."""
        s, t = CallCounter(student), CallCounter(truth.denoiser)
        t0 = time.perf_counter()
        out = fn(s, t)
        seconds = time.perf_counter() - t0
        samples[name] = out
        rows.append({
            "run": name, "student_nfe": s.calls, "teacher_nfe": t.calls, "seconds": seconds,
            "nll": nll(out, truth, **boot), "mode_tv": mode_coverage(out, truth, **boot),
            "sliced_w2": sliced_wasserstein(out, reference, **boot),
        })

    progress = tqdm(total=5, desc="kdpp demo", unit="run")
    for name, fn in {
        f"student {args.steps} steps": lambda s, t: sampler(
            s, None, x, sigmas, 0.0, callback=keep("student"), disable=True, **noise(x)),
        f"student {args.steps + 1} steps": lambda s, t: sampler(
            s, None, x, timestep_sigmas(trailing_timesteps(args.steps + 1)), 0.0, disable=True, **noise(x)),
        f"student++ {args.steps} steps, k={args.k}": lambda s, t: sampler(
            s, t, x, sigmas, args.lam, args.k, renoise=args.renoise, seed=args.seed + 2,
            callback=keep("student++"), disable=True, **noise(x)),
    }.items():
        measure(name, fn)
        progress.update()
    # the teacher at the student++ run's real number of model calls (or the most steps below it)
    budget = rows[-1]["student_nfe"] + rows[-1]["teacher_nfe"]
    teacher_steps = 1
    while True:  # count the teacher's calls per step count on one sample (the count does not depend on the data)
        counter = CallCounter(truth.denoiser)
        teacher_run(teacher_steps + 1, x[:1], counter)
        if counter.calls > budget:
            break
        teacher_steps += 1
    measure(f"teacher {teacher_steps} steps", lambda s, t: teacher_run(teacher_steps, x, t))
    progress.update()
    measure("teacher 100 steps (DPM++ 2M)", lambda s, t: kdpp.sample_dpmpp_2m_distpp(
        t, None, x * (80.0 / float(sigmas[0])), karras_sigmas(100, 0.002, 80.0), 0.0, disable=True))
    progress.update()
    progress.close()
    floor = truth.sample(args.n, g)
    samples["truth (another sample)"] = floor
    rows.append({"run": "truth (another sample)", "student_nfe": 0, "teacher_nfe": 0, "seconds": 0.0,
                 "nll": nll(floor, truth, **boot), "mode_tv": mode_coverage(floor, truth, **boot),
                 "sliced_w2": sliced_wasserstein(floor, reference, **boot)})
    baseline = rows[0]["run"]
    for r in rows[1:4]:  # the runs at about the student's cost; each starts from the student's x_T and noise
        r["sliced_w2_minus_student"] = paired_difference(
            sliced_wasserstein, samples[r["run"]], samples[baseline], reference, n_boot=args.boot or 100)
    return {"args": vars(args), "rows": rows, "samples": samples, "trajectories": trajectories, "truth": truth,
            "sigmas": sigmas}


def table(rows: list[dict]) -> str:
    head = (f"{'run':30} {'NFE S+T':>7} {'NLL':>20} {'mode-mass TV':>24} {'sliced W2':>21} "
            f"{'sliced W2 - student':>28} {'time (1 run)':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        nfe = f"{r['student_nfe']}+{r['teacher_nfe']}"
        diff = str(r.get("sliced_w2_minus_student", "-"))
        lines.append(f"{r['run']:30} {nfe:>7} {str(r['nll']):>20} {str(r['mode_tv']):>24} "
                     f"{str(r['sliced_w2']):>21} {diff:>28} {r['seconds']:13.2f}s")
    return "\n".join(lines)


def figures(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    truth, samples = result["truth"], result["samples"]
    names = ["truth"] + [r["run"] for r in result["rows"][:4]]  # student N, N + 1, student++, teacher at equal NFE
    lim = float(truth.means.abs().max()) + 4 * float(truth.stds.max())
    grid = torch.linspace(-lim, lim, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = truth.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)).exp().reshape(200, 200)

    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharex=True, sharey=True)
    for ax, name in zip(axes, names):
        ax.contour(gx, gy, density, levels=6, colors="0.8", linewidths=0.6)
        pts = samples[name][:1500, :2]
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    paths = [out / "samples.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    from matplotlib.lines import Line2D

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.9), sharex=True, sharey=True)
    guided = 0
    for ax, name in zip(axes, ("student", "student++")):
        ax.contour(gx, gy, density, levels=6, colors="0.8", linewidths=0.6)
        steps = result["trajectories"][name]
        final = samples[[n for n in samples if n.startswith(name + " ")][0]][:16]
        path = torch.stack([s["x"] for s in steps] + [final])  # [steps + 1, 16, d]
        for j in range(path.shape[1]):
            ax.plot(path[1:, j, 0], path[1:, j, 1], "-o", ms=2, lw=0.8, color="C0", alpha=0.7)
        for s in steps:
            moved = (s["denoised"] - s["student_denoised"]).abs().sum() > 0
            if moved:  # the teacher's correction D -> R(D) on guided steps
                guided += 1
                d, r = s["student_denoised"], s["denoised"]
                ax.quiver(d[:, 0], d[:, 1], r[:, 0] - d[:, 0], r[:, 1] - d[:, 1], angles="xy", scale_units="xy",
                          scale=1, color="C3", width=0.004)
        ax.set_title(f"{name} trajectories", fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    handles = [Line2D([], [], color="C0", marker="o", ms=3, lw=0.8, label="sample path x_i (16 samples)"),
               Line2D([], [], color="C3", marker=r"$\rightarrow$", ms=12, ls="none",
                      label="teacher's correction D -> R(D)")]
    axes[1].legend(handles=handles, loc="upper right", fontsize=7, framealpha=0.9)
    args = result["args"]
    fig.text(0.5, 0.01, "Blue: 16 samples after each step to the end (x_T, at sigma_0, is off the plot). Red arrows: "
             f"on each teacher-guided step ({guided} guided step(s) drawn; lam = {args['lam']}, k = {args['k']}), "
             "from the student's denoised estimate D(x_i) to the refined estimate R(D) the step uses instead. "
             "No arrows: no step was guided (k = 0, lam = 0, or the guided step renoises to sigma 0).",
             ha="center", va="bottom", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    paths.append(out / "trajectories.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def have_matplotlib() -> bool:
    """Whether the figures can be drawn (matplotlib comes with ``pip install 'kdpp[demo]'``)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.toy:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("the digits demo needs scikit-learn: pip install 'kdpp[demo]' (or run the toy demo: "
                  "python -m kdpp.demo --toy)", file=sys.stderr)
            return 1
        from .learned import demo as digits

        return digits.main(args)
    return toy_main(args)


def toy_main(args: argparse.Namespace) -> int:
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not args.no_figures and not have_matplotlib():  # say so before computing, not after
        print("matplotlib is not installed: no figures this run (pip install 'kdpp[demo]' adds it; "
              "--no-figures hides this note)")
        args.no_figures = True
    print(f"kdpp {kdpp.__version__} demo: {args.distribution}, student = {STUDENTS[args.student]}; "
          f"solver {args.solver}, lam = {args.lam}, k = {args.k}, renoise = {args.renoise}, n = {args.n}")
    result = run(args)
    print(table(result["rows"]))
    print("Each metric: value [95% percentile bootstrap interval]. NFE S+T: student + teacher model calls,\n"
          "counted (the cost that carries over to real models; the teacher at equal NFE gets the student++ run's\n"
          "count). Time: the wall time of one run, noisy; here the exact teacher is cheaper than the flow-map\n"
          "student, so wall times are the other way round. NLL below the truth's means samples too\n"
          "concentrated; mode-mass TV and sliced W2 measure distance to the truth. 'sliced W2 - student': the run's\n"
          "sliced W2 minus the N-step student's (for the runs at about its cost), both against the same reference\n"
          "sample and paired by initial and solver noise (below 0 with its whole interval: closer to the truth\n"
          "than the student).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(
        {"args": result["args"], "rows": [{k: (v._asdict() if hasattr(v, "_asdict") else v) for k, v in r.items()}
                                          for r in result["rows"]]}, indent=2))
    written = [out / "results.json"]
    if not args.no_figures:
        written += figures(result, out)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
