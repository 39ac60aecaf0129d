"""Train kdpp.learned's nets on scikit-learn's 8x8 digits, on the CPU, and save them as fp16.

    python benchmarks/train_learned.py [--threads 1] [--seed 0] [--out PATH [--overwrite]]

Without ``--out`` the nets go to a new temporary folder (printed); the shipped weights are replaced only
when asked: ``--out kdpp/learned/digits_nets.pt --overwrite`` (an existing file is never overwritten
without ``--overwrite``). The shipped nets were made with that command (see ``provenance.json``).

Stages (every random draw seeded from --seed):

1. the classifier that defines the metrics (an MLP, 80/20 seeded split, noise augmentation);
2. the teacher: an EDM-preconditioned class-conditional residual MLP (Karras et al. 2022: log-normal
   noise levels, EDM loss weighting, EMA), the class label dropped to the null class with
   probability ``--label-dropout`` so that it supports classifier-free guidance
   (``--teacher-from`` reuses the classifier and teacher of an existing weights file instead);
3. teacher ODE trajectories (DPM++ 2M, 32 Karras steps, sigma 80 -> 0; the inner levels of each chunk of
   512 trajectories shifted by a seeded random fraction of a step, so that the states cover every noise
   level, not 32 fixed ones) from seeded noise: unconditional ones (null label) and class-conditional ones
   at each student's CFG scale w (the teacher as ``kdpp.CFGDenoiser(teacher, w)``), keeping the state at
   every step and the endpoint; ``--trajectories`` for training and ``--heldout`` more, never trained on,
   for the stopping rule;
4. the students (``kdpp.learned.STUDENTS``): endpoint predictors that regress the teacher's ODE endpoint
   from every state of the trajectories (EDM weighting), one quarter of each batch unconditional.

Stopping rule (distilled to convergence): every ``--eval-every`` iterations the EMA student's held-out
endpoint error (RMS over the held-out trajectories' states against their endpoints, one quarter
unconditional) is measured; after ``--patience`` evaluations without a relative improvement of
``--min-delta`` the learning rate drops 10x, and after ``--lr-drops`` drops the next such plateau stops
training (``--max-iters`` is a cap, and the provenance says whether a student hit it). Every
evaluation is in the provenance.

At the end the script measures, for every student, FD (kdpp.learned.metrics, 1000 samples, seed 0) plain
at 1..6 LCM steps, unconditional and at the student's CFG scale, the teacher's 40-step FD, and the
40-step teacher's requested-class accuracy; all go into the provenance, with the script, seed, git
revision, torch version, threads, wall time per stage and machine load.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import kdpp
from kdpp.learned.data import NULL_CLASS, load_digits, split
from kdpp.learned.metrics import DigitsMetrics, class_accuracy
from kdpp.learned.nets import DigitsClassifier, EDMDenoiser
from kdpp.learned.trained import (PROVENANCE, STUDENTS, TEACHER_CFG, WEIGHTS, load_nets, sample_student,
                                  sample_teacher)

ROOT = Path(__file__).resolve().parent.parent
#: Adam learning rate of each student before the plateau drops (a teacher-initialised net is fine-tuned)
STUDENT_LR = {"strong": 1e-3, "teacher_init": 2e-4, "small": 2e-3, "weakcfg": 1e-3}
CHUNK = 512
#: the levels renoised trajectories start from: the LCM trailing schedules' range (1..6 steps: 14.6 .. 0.4)
RENOISED_RANGE = (0.3, 15.0)


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def ema_update(target: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pt, p in zip(target.parameters(), model.parameters()):
            pt.lerp_(p, 1 - decay)


def edm_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """EDM's loss weight ``(s^2 + sd^2) / (s sd)^2`` (unit-variance targets for F)."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def train_classifier(x, y, args, log):
    train, test = split(len(x), seed=args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    torch.manual_seed(args.seed + 1)
    net = DigitsClassifier()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.classifier_iters)
    for it in range(args.classifier_iters):
        idx = train[torch.randint(0, len(train), (256,), generator=g)]
        xb = x[idx] + 0.1 * torch.randn(256, x.shape[1], generator=g)
        loss = torch.nn.functional.cross_entropy(net(xb), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    log(f"classifier: test accuracy {acc:.4f} on {len(test)} held-out digits")
    return net, acc


def train_teacher(x, y, args, log):
    g = torch.Generator().manual_seed(args.seed + 2)
    torch.manual_seed(args.seed + 2)
    net = EDMDenoiser(hidden=args.teacher_hidden, blocks=3, sigma_data=args.sigma_data)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=args.teacher_iters, pct_start=0.05)
    t0 = time.perf_counter()
    for it in range(args.teacher_iters):
        idx = torch.randint(0, len(x), (args.batch,), generator=g)
        x0, labels = x[idx], y[idx].clone()
        labels[torch.rand(args.batch, generator=g) < args.label_dropout] = NULL_CLASS
        sigma = (torch.randn(args.batch, generator=g) * 1.2 - 1.2).exp()  # EDM: P_mean -1.2, P_std 1.2
        noisy = x0 + sigma[:, None] * torch.randn(x0.shape, generator=g)
        err = ((net(noisy, sigma, labels) - x0) ** 2).mean(1)
        loss = (edm_weight(sigma, args.sigma_data) * err).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, net, args.ema)
        if it % 1000 == 0 or it == args.teacher_iters - 1:
            log(f"teacher iter {it:5d} loss {loss.item():.4f} {time.perf_counter() - t0:6.1f}s")
    return ema.eval()


def jittered_karras(steps: int, shift: float, sigma_max: float = 80.0) -> torch.Tensor:
    """``karras_sigmas(steps, 0.002, sigma_max)`` with its inner levels moved by ``shift`` - 0.5 (``shift`` in
    [0, 1)) of a ramp step; the first (sigma_max), the last positive (0.002) and the final 0 stay."""
    ramp = torch.arange(steps, dtype=torch.float64)
    ramp[1:-1] += shift - 0.5
    ramp /= steps - 1
    lo, hi = 0.002 ** (1 / 7), sigma_max ** (1 / 7)
    return torch.cat([(hi + ramp * (lo - hi)) ** 7, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def trajectories(teacher, w, n, seed, steps=32, start_from=None):
    """``(states [n, L, 64], sigmas [n, L], endpoints [n, 64], labels [n])`` of teacher ODE runs at CFG ``w``
    (``w=None``: unconditional), ``L = steps`` states per run: from noise at sigma 80 down to 0.002, or with
    ``start_from = (endpoints, labels)`` of earlier runs, from those endpoints renoised to a level drawn
    log-uniformly in ``RENOISED_RANGE`` per chunk (the states multistep consistency sampling visits)."""
    g = torch.Generator().manual_seed(seed)
    out = {"states": [], "sigmas": [], "endpoints": [], "labels": []}
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        shift = torch.rand((), generator=g, dtype=torch.float64).item()
        if start_from is None:
            sigmas = jittered_karras(steps, shift)
            x = torch.randn(m, 64, generator=g) * sigmas[0].item()
            labels = torch.full((m,), NULL_CLASS) if w is None else torch.randint(0, 10, (m,), generator=g)
        else:
            lo, hi = (math.log(v) for v in RENOISED_RANGE)
            level = math.exp(lo + torch.rand((), generator=g, dtype=torch.float64).item() * (hi - lo))
            sigmas = jittered_karras(steps, shift, level)
            x = start_from[0][start:start + m] + torch.randn(m, 64, generator=g) * level
            labels = start_from[1][start:start + m]
        model, extra = (teacher, {}) if w is None else (
            kdpp.CFGDenoiser(teacher, scale=w, cond_key="class_labels"),
            {"cond": labels, "uncond": torch.full_like(labels, NULL_CLASS)})
        states = []
        end = kdpp.sample_dpmpp_2m_distpp(model, None, x, sigmas, 0.0, 0, extra_args=extra, disable=True,
                                          callback=lambda info: states.append(info["x"]))
        out["states"].append(torch.stack(states, 1))
        out["sigmas"].append(sigmas[:-1].float().expand(m, steps))
        out["endpoints"].append(end)
        out["labels"].append(labels)
    return tuple(torch.cat(v) for v in out.values())


@torch.no_grad()
def target_error(teacher, w, seed, n=256, steps=128) -> float:
    """RMS difference between the training targets' solver (32 DPM++ 2M steps) and ``steps`` steps, from the same
    noise at CFG ``w``: how far the targets are from the teacher's exact ODE endpoint."""
    a = trajectories(teacher, w, n, seed)[2]
    return (a - trajectories(teacher, w, n, seed, steps=steps)[2]).pow(2).mean().sqrt().item()


def heldout_pairs(data, per_traj, seed):
    """Fixed ``(state, sigma, endpoint, label)`` pairs: ``per_traj`` random states of each held-out trajectory."""
    states, sigmas, ends, labels = data
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(len(states)).repeat_interleave(per_traj)
    j = torch.randint(0, states.shape[1], (len(i),), generator=g)
    return states[i, j], sigmas[i, j], ends[i], labels[i]


@torch.no_grad()
def endpoint_rms(net, pairs) -> float:
    xs, ss, ends, labels = pairs
    err = torch.cat([((net(xs[a:a + 4096], ss[a:a + 4096], labels[a:a + 4096]) - ends[a:a + 4096]) ** 2).mean(1)
                     for a in range(0, len(xs), 4096)])
    return err.mean().sqrt().item()


def train_student(name, spec, data, heldout, teacher, args, log):
    """Distil ``name`` until its held-out endpoint error plateaus (see the module docstring)."""
    fraction = args.renoised_fraction
    g = torch.Generator().manual_seed(args.seed + 10 + list(STUDENTS).index(name))
    torch.manual_seed(args.seed + 10 + list(STUDENTS).index(name))
    if spec["init"] == "teacher":
        net = copy.deepcopy(teacher).float().train().requires_grad_(True)
        assert (net.config["hidden"], net.config["blocks"]) == (spec["hidden"], spec["blocks"]), net.config
    else:
        net = EDMDenoiser(hidden=spec["hidden"], blocks=spec["blocks"], sigma_data=args.sigma_data)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    lr = STUDENT_LR[name]
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    n_u = args.batch // 4

    def heldout_error():
        return 0.25 * endpoint_rms(ema, heldout["uncond"]) ** 2 + 0.75 * endpoint_rms(ema, heldout[spec["w"]]) ** 2

    history, best, stale, drops, stop = [], math.inf, 0, 0, "max_iters"
    t0 = time.perf_counter()
    it = 0
    for it in range(1, args.max_iters + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, it / args.warmup)
        parts = []
        for pools, m in ((data["uncond"], n_u), (data[spec["w"]], args.batch - n_u)):
            m_r = round(m * fraction) if len(pools) > 1 else 0
            for (st, sig, end, lab), count in zip(pools, (m - m_r, m_r)):
                i = torch.randint(0, st.shape[0], (count,), generator=g)
                j = torch.randint(0, st.shape[1], (count,), generator=g)
                parts.append((st[i, j], sig[i, j], end[i], lab[i]))
        xs, ss, target, labels = (torch.cat(p) for p in zip(*parts))
        err = ((net(xs, ss, labels) - target) ** 2).mean(1)
        loss = (edm_weight(ss, args.sigma_data) * err).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, net, args.ema)
        if it % args.eval_every == 0:
            rms = math.sqrt(heldout_error())
            history.append({"iter": it, "heldout_rms": round(rms, 5), "lr": lr, "loss": round(loss.item(), 5),
                            "seconds": round(time.perf_counter() - t0, 1)})
            log(f"student {name} iter {it:6d} loss {loss.item():.4f} held-out endpoint RMS {rms:.4f} lr {lr:.1e} "
                f"{time.perf_counter() - t0:7.1f}s")
            if rms < best * (1 - args.min_delta):
                best, stale = rms, 0
            else:
                stale += 1
            if stale >= args.patience:
                if drops == args.lr_drops:
                    stop = "plateau"
                    break
                drops, stale, lr = drops + 1, 0, lr / 10
    return ema, {"iterations": it, "stopped_by": stop, "best_heldout_rms": round(best, 5),
                 "final_heldout_rms": history[-1]["heldout_rms"] if history else None, "lr": STUDENT_LR[name],
                 "evaluations": history}


@torch.no_grad()
def fd_by_steps(nets, metrics, n=1000, seed=0):
    """Plain FD at 1..6 LCM steps of every student (uncond and at its w), and the 40-step teacher's FD."""
    labels = torch.arange(n) % 10
    out = {"teacher_40": {"uncond": metrics(sample_teacher(nets["teacher"], None, 40, seed=seed, n=n))["fd"],
                          "cond": metrics(sample_teacher(nets["teacher"], labels, 40, seed=seed), labels)["fd"]}}
    for name in STUDENTS:
        if name in nets:
            out[name] = {mode: [round(metrics(sample_student(nets[name], lab, steps, seed=seed, n=n), lab)["fd"], 2)
                                for steps in range(1, 7)]
                         for mode, lab in (("uncond", None), ("cond", labels))}
    return out


def fp16_state(net):
    return {"config": net.config, "state_dict": {k: v.half() for k, v in net.state_dict().items()}}


def output_path(args) -> Path:
    if args.out is None:
        return Path(tempfile.mkdtemp(prefix="kdpp-learned-train-")) / WEIGHTS.name
    out = Path(args.out)
    for path in (out, out.with_name(PROVENANCE.name)):
        if path.exists() and not args.overwrite:
            raise SystemExit(f"{path} exists; pass --overwrite to replace it (the shipped weights are replaced "
                             f"only when asked)")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 on a quiet 2-core machine)")
    p.add_argument("--teacher-iters", type=int, default=4000)
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--teacher-from", default=None, help="reuse the classifier and teacher of this weights file")
    p.add_argument("--classifier-iters", type=int, default=3000)
    p.add_argument("--trajectories", type=int, default=32768, help="teacher ODE runs per CFG scale (training)")
    p.add_argument("--heldout", type=int, default=1024, help="more teacher ODE runs per CFG scale (stopping rule)")
    p.add_argument("--renoised-fraction", type=float, default=0.5, help="share of each batch drawn from teacher "
                   "ODE runs restarted from renoised endpoints (0: none are generated)")
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--warmup", type=int, default=200, help="student learning-rate warm-up iterations")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--patience", type=int, default=4)
    p.add_argument("--min-delta", type=float, default=0.01, help="relative improvement that resets the patience")
    p.add_argument("--lr-drops", type=int, default=1)
    p.add_argument("--max-iters", type=int, default=40000)
    p.add_argument("--label-dropout", type=float, default=0.15)
    p.add_argument("--sigma-data", type=float, default=0.75)
    p.add_argument("--no-fd", action="store_true", help="skip the final FD measurements")
    p.add_argument("--out", default=None, help=f"weights file (default: a new temporary folder; the shipped one is "
                   f"{WEIGHTS.relative_to(ROOT)})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its provenance.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = output_path(args)
    lines, times, training = [], {}, {}
    t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    def stage(name, t0):
        times[name] = round(time.perf_counter() - t0, 1)
        log(f"== {name}: {times[name]} s")

    load_before = os.getloadavg()
    revision = git_revision()  # the code that trains, before the run writes anything (its output may be tracked)
    x, y = load_digits()
    if args.teacher_from:
        reused = load_nets(args.teacher_from)
        classifier, teacher = reused["classifier"], reused["teacher"]
        _, test = split(len(x), seed=args.seed)
        clf_acc = class_accuracy(classifier, x[test], y[test])
        log(f"classifier and teacher from {args.teacher_from}: classifier test accuracy {clf_acc:.4f}")
    else:
        t0 = time.perf_counter()
        classifier, clf_acc = train_classifier(x, y, args, log)
        stage("classifier", t0)
        t0 = time.perf_counter()
        teacher = train_teacher(x, y, args, log)
        stage("teacher", t0)
    t0 = time.perf_counter()
    scales = sorted({STUDENTS[name]["w"] for name in args.students})
    data, heldout = {}, {}
    for j, w in enumerate([None, *scales]):
        key, n = ("uncond" if w is None else w), args.trajectories + args.heldout
        full = trajectories(teacher, w, n, args.seed + 3 + j)
        pools = [full]
        if args.renoised_fraction > 0:  # from the same runs' endpoints: held-out ones stay held out
            pools.append(trajectories(teacher, w, n, args.seed + 20 + j, steps=16, start_from=full[2:]))
        data[key] = [tuple(v[:args.trajectories] for v in pool) for pool in pools]
        pairs = [heldout_pairs(tuple(v[args.trajectories:] for v in pool), 8, args.seed + 7 + j) for pool in pools]
        heldout[key] = tuple(torch.cat(parts) for parts in zip(*pairs))
    solver_rms = {("uncond" if w is None else str(w)): round(target_error(teacher, w, args.seed + 30), 5)
                  for w in [None, *scales]}
    log(f"training targets (32 steps) vs 128-step endpoints, RMS: {solver_rms}")
    stage("trajectories", t0)
    nets = {"classifier": fp16_state(classifier), "teacher": fp16_state(teacher)}
    for name in args.students:
        t0 = time.perf_counter()
        student, training[name] = train_student(name, STUDENTS[name], data, heldout, teacher, args, log)
        nets[name] = fp16_state(student)
        stage(f"student {name}", t0)
    del data
    total = round(time.perf_counter() - t_start, 1)
    torch.save(nets, out)

    # the saved (fp16-rounded) nets: the 40-step teacher's requested-class accuracy and every student's FD
    loaded = load_nets(out)
    labels = torch.arange(1000) % 10
    samples = sample_teacher(loaded["teacher"], labels, steps=40, w=TEACHER_CFG, seed=args.seed)
    teacher_acc = class_accuracy(loaded["classifier"], samples, labels)
    log(f"teacher, 40 DPM++ 2M steps, CFG {TEACHER_CFG}: requested-class accuracy {teacher_acc:.4f} (1000 samples)")
    fds = None
    if not args.no_fd:
        t0 = time.perf_counter()
        fds = fd_by_steps(loaded, DigitsMetrics(loaded["classifier"], x, y), seed=args.seed)
        for name, v in fds.items():
            log(f"FD {name}: {v}")
        stage("FD by steps", t0)
    provenance = {
        "script": "benchmarks/train_learned.py",
        "command": " ".join([Path(sys.executable).name, "benchmarks/train_learned.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args) | {"out": str(out.relative_to(ROOT)) if out.is_absolute() and ROOT in out.parents else str(out)},
        "seed": args.seed,
        "git_revision": revision,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "threads": args.threads,
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": times | {"total": total},
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "classifier_test_accuracy": round(clf_acc, 4),
        "teacher_40step_accuracy": round(teacher_acc, 4),
        "stopping_rule": (f"every {args.eval_every} iterations, the EMA student's held-out endpoint RMS error "
                          f"({args.heldout} held-out teacher ODE runs per CFG scale, 8 states each, one quarter "
                          f"unconditional); {args.patience} evaluations without a relative improvement of "
                          f"{args.min_delta}: learning rate / 10; after {args.lr_drops} drops the next such plateau "
                          f"stops (cap {args.max_iters} iterations)"),
        "target_solver_rms": solver_rms,
        "students": {name: STUDENTS[name] | training[name] for name in args.students},
        "fd_by_steps": fds,
        "parameters": {name: sum(v.numel() for v in blob["state_dict"].values()) for name, blob in nets.items()},
        "bytes": out.stat().st_size,
        "log": lines,
    }
    out.with_name(PROVENANCE.name).write_text(json.dumps(provenance, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) and {PROVENANCE.name} after {total} s")
    return out


if __name__ == "__main__":
    main()
