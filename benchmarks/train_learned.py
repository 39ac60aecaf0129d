"""Train kdpp.learned's nets on scikit-learn's 8x8 digits, on the CPU, and ship them as fp16.

    python benchmarks/train_learned.py [--threads 1] [--seed 0] [--out kdpp/learned/digits_nets.pt]

Stages (every one seeded from --seed):

1. the classifier that defines the metrics (an MLP, 80/20 seeded split, noise augmentation);
2. the teacher: an EDM-preconditioned class-conditional residual MLP (Karras et al. 2022: log-normal
   noise levels, EDM loss weighting, EMA), the class label dropped to the null class with
   probability ``--label-dropout`` so that it supports classifier-free guidance;
3. teacher ODE trajectories (DPM++ 2M, 32 Karras steps, sigma 80 -> 0) from seeded noise: unconditional
   ones (null label) and class-conditional ones at each student's CFG scale w (the teacher as
   ``kdpp.CFGDenoiser(teacher, w)``), keeping the state at every step and the endpoint;
4. the students: endpoint predictors that regress the teacher's ODE endpoint from every state of the
   trajectory (EDM weighting), one quarter of each batch unconditional:
   ``strong`` (256 wide, distilled at w = 4), ``small`` (a narrow net, w = 4: grainy
   samples) and ``weakcfg`` (the strong architecture distilled at w = 0.3: weak class alignment).

Writes the fp16 weights and a provenance record (script, seed, git revision, torch version,
threads, wall time per stage, machine load) next to them, and prints the classifier's test
accuracy and the 40-step teacher's requested-class accuracy (both go into the provenance).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

import kdpp
from kdpp.learned.data import NULL_CLASS, load_digits, split
from kdpp.learned.nets import DigitsClassifier, EDMDenoiser
from kdpp.learned.metrics import class_accuracy
from kdpp.learned.trained import PROVENANCE, STUDENTS, TEACHER_CFG, WEIGHTS, load_nets, sample_teacher
from kdpp.schedules import karras_sigmas

ROOT = Path(__file__).resolve().parent.parent


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
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.teacher_iters, pct_start=0.05)
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


@torch.no_grad()
def trajectories(teacher, w, n, seed):
    """``(states [n, L, 64], sigmas [L], endpoints [n, 64], labels [n])`` of teacher ODE runs at CFG ``w``
    (``w=None``: unconditional)."""
    sigmas = karras_sigmas(32, 0.002, 80.0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g) * sigmas[0].item()
    if w is None:
        labels = torch.full((n,), NULL_CLASS)
        model, extra = teacher, {}
    else:
        labels = torch.randint(0, 10, (n,), generator=g)
        model = kdpp.CFGDenoiser(teacher, scale=w, cond_key="class_labels")
        extra = {"cond": labels, "uncond": torch.full_like(labels, NULL_CLASS)}
    states = []
    out = kdpp.sample_dpmpp_2m_distpp(model, None, x, sigmas, 0.0, 0, extra_args=extra, disable=True,
                                      callback=lambda info: states.append(info["x"]))
    return torch.stack(states, 1), sigmas[:-1].float(), out, labels


def train_student(name, spec, data, args, log):
    (st_u, sig, end_u, lab_u), (st_c, _, end_c, lab_c) = data["uncond"], data[spec["w"]]
    g = torch.Generator().manual_seed(args.seed + 10 + list(STUDENTS).index(name))
    torch.manual_seed(args.seed + 10 + list(STUDENTS).index(name))
    net = EDMDenoiser(hidden=spec["hidden"], blocks=spec["blocks"], sigma_data=args.sigma_data)
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    iters = args.student_iters
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=iters, pct_start=0.05)
    n_u = args.batch // 4
    t0 = time.perf_counter()
    for it in range(iters):
        parts = []
        for st, end, lab, m in ((st_u, end_u, lab_u, n_u), (st_c, end_c, lab_c, args.batch - n_u)):
            i = torch.randint(0, st.shape[0], (m,), generator=g)
            j = torch.randint(0, st.shape[1], (m,), generator=g)
            parts.append((st[i, j], sig[j], end[i], lab[i]))
        xs, ss, target, labels = (torch.cat(p) for p in zip(*parts))
        err = ((net(xs, ss, labels) - target) ** 2).mean(1)
        loss = (edm_weight(ss, args.sigma_data) * err).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        ema_update(ema, net, args.ema)
        if it % 1000 == 0 or it == iters - 1:
            log(f"student {name} iter {it:5d} loss {loss.item():.4f} {time.perf_counter() - t0:6.1f}s")
    return ema.eval()


def fp16_state(net):
    return {"config": net.config, "state_dict": {k: v.half() for k, v in net.state_dict().items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 on a quiet 2-core machine)")
    p.add_argument("--teacher-iters", type=int, default=4000)
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--student-iters", type=int, default=2000)
    p.add_argument("--classifier-iters", type=int, default=3000)
    p.add_argument("--trajectories", type=int, default=8192, help="teacher ODE runs per CFG scale")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.15)
    p.add_argument("--sigma-data", type=float, default=0.75)
    p.add_argument("--out", default=str(WEIGHTS))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    lines, times = [], {}
    t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    def stage(name, t0):
        times[name] = round(time.perf_counter() - t0, 1)
        log(f"== {name}: {times[name]} s")

    load_before = os.getloadavg()
    x, y = load_digits()
    t0 = time.perf_counter()
    classifier, clf_acc = train_classifier(x, y, args, log)
    stage("classifier", t0)
    t0 = time.perf_counter()
    teacher = train_teacher(x, y, args, log)
    stage("teacher", t0)
    t0 = time.perf_counter()
    scales = sorted({spec["w"] for spec in STUDENTS.values()})
    data = {"uncond": trajectories(teacher, None, args.trajectories, args.seed + 3)}
    for j, w in enumerate(scales):
        data[w] = trajectories(teacher, w, args.trajectories, args.seed + 4 + j)
    stage("trajectories", t0)
    nets = {"classifier": fp16_state(classifier), "teacher": fp16_state(teacher)}
    for name, spec in STUDENTS.items():
        t0 = time.perf_counter()
        nets[name] = fp16_state(train_student(name, spec, data, args, log))
        stage(f"student {name}", t0)
    total = round(time.perf_counter() - t_start, 1)
    torch.save(nets, out)

    # the shipped (fp16-rounded) teacher, 40 DPM++ 2M steps at CFG w = 4: requested-class accuracy
    loaded = load_nets(out)
    labels = torch.arange(1000) % 10
    samples = sample_teacher(loaded["teacher"], labels, steps=40, w=TEACHER_CFG, seed=args.seed)
    teacher_acc = class_accuracy(loaded["classifier"], samples, labels)
    log(f"teacher, 40 DPM++ 2M steps, CFG {TEACHER_CFG}: requested-class accuracy {teacher_acc:.4f} (1000 samples)")
    provenance = {
        "script": "benchmarks/train_learned.py",
        "command": " ".join([Path(sys.executable).name, "benchmarks/train_learned.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args) | {"out": str(out.relative_to(ROOT)) if out.is_absolute() and ROOT in out.parents else str(out)},
        "seed": args.seed,
        "git_revision": git_revision(),
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
        "parameters": {name: sum(v.numel() for v in blob["state_dict"].values()) for name, blob in nets.items()},
        "bytes": out.stat().st_size,
        "log": lines,
    }
    out.with_name(PROVENANCE.name).write_text(json.dumps(provenance, indent=1) + "\n")
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) after {total} s")


if __name__ == "__main__":
    main()
