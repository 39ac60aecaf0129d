"""The paper's SDXL setup: a distilled student + the SDXL base teacher, with and without Distillation++.

    python benchmarks/sdxl_paper_setup.py --base PATH/TO/sdxl-base --student PATH/TO/student-unet \\
        --family sdxl-lightning --steps 4 --prompts prompts.txt --out sdxl-out [--lam 0.1 --k 1]

LoRA students (--family lcm-lora or sdxl-lightning-lora) take --lora PATH/TO/lora instead of
--student: the LoRA is loaded into the base pipeline's UNet, which is then both the student
(adapters on) and the teacher (adapters off; kdpp.diffusers.lora). Paths may also come from
KDPP_SDXL_BASE, KDPP_STUDENT_UNET and KDPP_STUDENT_LORA. Weights are read with
local_files_only=True (nothing is downloaded). For each prompt (a COCO-style caption per line)
it writes the student's and the student++'s image and prints seconds per image for the two runs
it times: "student" (N steps, lam = 0) and "student++" (the same N steps, the first k of them
teacher-guided; default lam and k: the preset's). A student at N + 1 steps is not run: the
presets only sample the step counts each family was distilled for. Exits with status 2 and the
reason when the weights are not there.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import torch

import kdpp
from kdpp.diffusers.lora import SharedLoRAModel
from kdpp.diffusers.presets import STUDENTS, sdxl_teacher
from kdpp.diffusers.sdxl import SDXLConditioning, generate

RUNS = ("student", "student++")  #: the timed runs, in the order printed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=os.environ.get("KDPP_SDXL_BASE"))
    p.add_argument("--student", default=os.environ.get("KDPP_STUDENT_UNET"), help="the student UNet's folder")
    p.add_argument("--lora", default=os.environ.get("KDPP_STUDENT_LORA"),
                   help="LoRA families (lcm-lora, sdxl-lightning-lora): the LoRA's local file or folder; "
                        "student and teacher then share the base UNet (no --student)")
    p.add_argument("--family", default="sdxl-lightning", choices=sorted(STUDENTS))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", required=True, help="a text file, one caption per line")
    p.add_argument("--out", default="sdxl-out")
    p.add_argument("--lam", type=float, default=None)
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args(argv)
    lora = args.family.endswith("-lora")
    student_arg = ("--lora / KDPP_STUDENT_LORA", args.lora) if lora else ("--student / KDPP_STUDENT_UNET", args.student)
    for name, path in (("--base / KDPP_SDXL_BASE", args.base), student_arg):
        if not path or not Path(path).exists():
            print(f"skipped: {name} is not a local folder ({path!r}); weights are never downloaded", file=sys.stderr)
            return 2
    import diffusers

    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(args.base, torch_dtype=dtype, local_files_only=True).to(device)
    if lora:  # one UNet: the LoRA's adapters on for the student, off for the teacher
        pipe.load_lora_weights(args.lora, local_files_only=True)
        pair = SharedLoRAModel(pipe.unet)
        run = functools.partial(generate, pair.student, pair.teacher)
    else:
        student = diffusers.UNet2DConditionModel.from_pretrained(args.student, torch_dtype=dtype, local_files_only=True)
        run = functools.partial(generate, student.to(device), pipe.unet)
    preset = STUDENTS[args.family](args.steps)
    teacher = sdxl_teacher(preset.sampler)
    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    times = {name: 0.0 for name in RUNS}
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start:start + args.batch]
        with torch.no_grad():
            cond = SDXLConditioning(*pipe.encode_prompt(chunk, device=device, do_classifier_free_guidance=True))
        seeds = list(range(start, start + len(chunk)))
        for name, lam in zip(RUNS, (0.0, args.lam)):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            images = run(cond, preset, teacher=teacher, seeds=seeds, lam=lam, k=args.k, height=args.height,
                         width=args.width, vae=pipe.vae, dtype=dtype, device=device, disable=True)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name] += time.perf_counter() - t0
            for seed, image in zip(seeds, images):
                image.save(out / f"{seed:05d}-{name}.png")
    n = len(prompts)
    print(f"{preset.name}, teacher CFG {teacher.cfg_scale}, kdpp {kdpp.__version__}, {device}, {args.dtype}")
    print(f"{'run':12} {'s / image':>10}")
    for name, seconds in times.items():
        print(f"{name:12} {seconds / n:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
