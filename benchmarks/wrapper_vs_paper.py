"""The any-sampler wrapper (kdpp.wrappers.DistillationDenoiser) against the paper's form, on the toy.

    python benchmarks/wrapper_vs_paper.py [--seeds 5] [--n 2000] [--out benchmarks/results]

Ring, 'weights' student (the flow map's denoiser analogue: the exact denoiser of the mixture with
the wrong mode weights), SD-style 4-step trailing schedule, random renoising, lam = 1.
k-diffusion's samplers run on the wrapped student; kdpp's Euler runs the paper's form. Each row
is labelled by the teacher calls per run, counted by a wrapper around the teacher (Heun evaluates
its denoiser twice on a step, and a guided step to sigma 0 calls the teacher at its own level), beside
the ``k`` it was given.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import kdpp
from kdpp.demo import CallCounter
from kdpp.schedules import timestep_sigmas, trailing_timesteps
from kdpp.toy import mode_coverage, nll, ring
from kdpp.wrappers import DistillationDenoiser

sys.path.insert(0, str(Path(__file__).resolve().parent))
from claims import fmt, interval  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None) -> None:
    from _kdiffusion import expose_kdiffusion_sampling

    expose_kdiffusion_sampling()  # also where k-diffusion came with --no-deps (the README's test environment)
    import k_diffusion.sampling as ks

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mix = ring()
    student = mix.shifted(weights=torch.linspace(1.0, 4.0, mix.K)).denoiser
    sigmas = timestep_sigmas(trailing_timesteps(4))
    samplers = {
        "kdpp Euler (paper form)": lambda x, teacher, k, seed: kdpp.sample_euler_distpp(
            student, teacher, x, sigmas, 1.0, k, seed=seed, disable=True),
        "k-diffusion Euler + wrapper": lambda x, teacher, k, seed: ks.sample_euler(
            DistillationDenoiser(student, teacher, sigmas, 1.0, k, seed=seed), x, sigmas, disable=True),
        "k-diffusion Heun + wrapper": lambda x, teacher, k, seed: ks.sample_heun(
            DistillationDenoiser(student, teacher, sigmas, 1.0, k, seed=seed), x, sigmas, disable=True),
        "k-diffusion DPM++ 2M SDE + wrapper": lambda x, teacher, k, seed: ks.sample_dpmpp_2m_sde(
            DistillationDenoiser(student, teacher, sigmas, 1.0, k, seed=seed), x, sigmas, disable=True),
    }
    rows = []
    for name, fn in samplers.items():
        for k in (0, 1, 2, 4):
            tv, nl, calls = [], [], set()
            for seed in range(args.seeds):
                x = torch.randn(args.n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
                torch.manual_seed(seed)
                teacher = CallCounter(mix.denoiser)
                out = fn(x, teacher, k, seed + 100)
                calls.add(teacher.calls)
                tv.append(mode_coverage(out, mix, n_boot=0).value)
                nl.append(nll(out, mix, n_boot=0).value)
            if len(calls) != 1:
                raise RuntimeError(f"{name}, k = {k}: the teacher calls differ between seeds: {sorted(calls)}")
            rows.append({"sampler": name, "teacher_calls": calls.pop(), "k": k, "mode_tv": interval(tv),
                         "nll": interval(nl)})
    lines = [f"Command: `python benchmarks/wrapper_vs_paper.py --seeds {args.seeds} --n {args.n}`; kdpp {kdpp.__version__}, "
             f"torch {torch.__version__}; teacher calls per run counted by a wrapper around the teacher. "
             "Mean over seeds [95% t-interval over seeds] (lower is better).", "",
             "| sampler | teacher calls | k | mode-mass TV | NLL |", "|---|---|---|---|---|"]
    lines += [f"| {r['sampler']} | {r['teacher_calls']} | {r['k']} | {fmt(r['mode_tv'])} | {fmt(r['nll'])} |"
              for r in rows]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "wrapper_vs_paper.json").write_text(json.dumps(rows, indent=1))
    (out / "wrapper_vs_paper.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
