"""Consistency distillation of kdpp.toy's MLP student from the exact ring teacher, on the CPU.

    python benchmarks/train_toy_student.py [--iters 4000] [--out PATH [--overwrite]]

Without ``--out`` the student goes to a new temporary folder (printed); the shipped weights are replaced
only when asked: ``--out kdpp/toy/ring_cd_student.pt --overwrite`` (an existing file is never overwritten
without ``--overwrite``).

Consistency distillation (Song et al. 2023, Algorithm 2): for x0 ~ ring, a pair of adjacent
Karras levels s_{n+1} > s_n, x = x0 + s_{n+1} z, one Heun step of the probability-flow ODE
with the exact teacher denoiser gives x_hat at s_n; the student is trained so that
f(x, s_{n+1}) = f_ema(x_hat, s_n) (squared error, EMA target). The student learns the
teacher's flow map, imperfectly: that error is what Distillation++ corrects.
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from kdpp.schedules import karras_sigmas
from kdpp.toy import ring
from kdpp.toy.trained import WEIGHTS, MLPConsistencyStudent


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=4000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--levels", type=int, default=40, help="Karras discretisation N of [0.002, 80]")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help=f"weights file (default: a new temporary folder; the shipped one is "
                   f"kdpp/toy/{WEIGHTS.name})")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the shipped student: 2)")
    args = p.parse_args(argv)
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="kdpp-toy-student-")) / WEIGHTS.name
    else:
        out = Path(args.out)
        if out.exists() and not args.overwrite:
            raise SystemExit(f"{out} exists; pass --overwrite to replace it (the shipped weights are replaced only "
                             f"when asked)")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    teacher = ring(dtype=torch.float32)
    levels = karras_sigmas(args.levels, 0.002, 80.0)[:-1].float().flip(0)  # increasing
    student = MLPConsistencyStudent()
    target = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iters)
    t0 = time.perf_counter()
    for it in range(args.iters):
        x0 = teacher.sample(args.batch).float()
        n = torch.randint(0, len(levels) - 1, (args.batch,))
        s_lo, s_hi = levels[n], levels[n + 1]
        x = x0 + s_hi[:, None] * torch.randn_like(x0)
        with torch.no_grad():  # one Heun step of the PF-ODE with the exact teacher
            d = (x - teacher.denoiser(x, s_hi)) / s_hi[:, None]
            x_euler = x + (s_lo - s_hi)[:, None] * d
            d2 = (x_euler - teacher.denoiser(x_euler, s_lo)) / s_lo[:, None]
            x_hat = x + (s_lo - s_hi)[:, None] * (d + d2) / 2
            want = target(x_hat, s_lo)
        loss = ((student(x, s_hi) - want) ** 2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            for pt, ps in zip(target.parameters(), student.parameters()):
                pt.lerp_(ps, 1 - args.ema)
        if it % 500 == 0 or it == args.iters - 1:
            print(f"iter {it:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:6.1f}s", flush=True)
    torch.save({"config": target.config, "state_dict": target.state_dict()}, out)
    print(f"wrote {out} after {time.perf_counter() - t0:.1f}s")
    return out


if __name__ == "__main__":
    main()
