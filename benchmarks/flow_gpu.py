"""FLUX-size Distillation++ on a GPU: guided / plain wall-time ratio and peak memory, side by side.

    PYTHONPATH=. python benchmarks/flow_gpu.py            # CUDA; about a minute on an H100
    PYTHONPATH=. python benchmarks/flow_gpu.py --tiny     # a CPU smoke run of the same code (nothing recorded)

Builds two transformers of the FLUX.1 architecture (FLUX.1-dev's configuration: 19 double and 38
single blocks, 3072 wide, about 12B parameters each) with random weights, directly on the device
in bfloat16 (built on the meta device, then ``normal_(0, 0.02)`` weights, unit norm scales, zero
biases: no download, seconds): the student without a guidance embedding (FLUX.1-schnell), the
teacher with one (FLUX.1-dev). Then it runs :func:`kdpp.diffusers.flux.generate` with the
``flux_schnell(4)`` preset, 256 T5 tokens for the student and 512 for the teacher, at 1024 x 1024,
batch 1: plain (``lam = 0``: 4 student forwards, no teacher call) and guided (``lam = 0.5, k = 1``:
4 student forwards + 1 teacher forward; the cost does not depend on ``lam``, the preset's default is 0.1), interleaved, one warm-up each, then ``--repeats`` timed
runs of each. It records the median wall times, their ratio (the model-call count alone predicts
(4 + 1) / 4 = 1.25), and the peak CUDA memory of each run (both models are resident in both).
Results go to benchmarks/results/flow_gpu.{json,md} with the card name.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from kdpp.diffusers import flow_presets, flux
from kdpp.diffusers.flow_models import FlowConditioning

#: FLUX.1-dev's transformer configuration (FLUX.1-schnell's differs only in guidance_embeds)
FLUX_DEV_CONFIG = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                   "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}
#: diffusers' own test configuration, for the CPU smoke run
TINY_CONFIG = {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
               "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32,
               "axes_dims_rope": [4, 4, 8]}
RESULTS = Path(__file__).parent / "results"
#: the guided run's lam, as recorded (0.5; the preset's default is 0.1): one teacher call costs the same at any lam
GUIDED_LAM = 0.5


def build(config: dict, guidance_embeds: bool, device: torch.device, dtype: torch.dtype, seed: int):
    """A FluxTransformer2DModel with random weights, allocated directly on ``device`` in ``dtype``."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config, guidance_embeds=guidance_embeds)
    model = model.to(dtype=dtype).to_empty(device=device).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        else:
            p.fill_(1.0 if name.endswith("weight") else 0.0)
    return model


def run(tiny: bool = False, size: int = 1024, repeats: int = 3, out: Path | None = RESULTS) -> dict:
    """Measure plain vs guided sampling; write the results to ``out`` (unless ``None``) and return them."""
    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    config = TINY_CONFIG if tiny else FLUX_DEV_CONFIG
    size = 64 if tiny else size
    started = time.perf_counter()
    student = build(config, False, device, dtype, seed=0)
    teacher = build(config, True, device, dtype, seed=1)
    if cuda:
        torch.cuda.synchronize()
    build_s = time.perf_counter() - started
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    params = sum(p.numel() for p in student.parameters())
    g = torch.Generator().manual_seed(2)
    width, pooled = config["joint_attention_dim"], config["pooled_projection_dim"]
    student_cond = FlowConditioning(torch.randn(1, 256, width, generator=g), pooled_prompt_embeds=torch.randn(1, pooled, generator=g))
    teacher_cond = FlowConditioning(torch.randn(1, 512, width, generator=g), pooled_prompt_embeds=student_cond.pooled_prompt_embeds)
    preset = flow_presets.flux_schnell(4)
    teacher_calls = []
    hook = teacher.register_forward_pre_hook(lambda module, args: teacher_calls.append(1))

    def sample(lam: float) -> tuple[float, float, torch.Tensor]:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        latents = flux.generate(student, teacher, student_cond, preset, teacher_conditioning=teacher_cond, seeds=[0],
                                height=size, width=size, lam=lam, k=1, disable=True)
        if cuda:
            torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        return time.perf_counter() - t0, peak, latents

    modes = {"plain": 0.0, "guided": GUIDED_LAM}
    times, peaks, calls, finite = {m: [] for m in modes}, {m: [] for m in modes}, {}, True
    for rep in range(repeats + 1):  # rep 0 warms up
        for mode, lam in modes.items():
            before = len(teacher_calls)
            seconds, peak, latents = sample(lam)
            calls[mode] = len(teacher_calls) - before
            finite = finite and bool(torch.isfinite(latents).all())
            if rep:
                times[mode].append(seconds)
                peaks[mode].append(peak)
    hook.remove()
    plain, guided = statistics.median(times["plain"]), statistics.median(times["guided"])
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu (smoke run, times meaningless)",
        "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""), "config": "tiny" if tiny else "FLUX.1-dev",
        "parameters_per_transformer": params, "size": size, "batch": 1, "steps": preset.steps, "k": 1, "lam": GUIDED_LAM,
        "repeats": repeats, "build_s": round(build_s, 2), "weights_gib": round(weights_gib, 2),
        "plain_s": round(plain, 4), "guided_s": round(guided, 4), "guided_over_plain": round(guided / plain, 4),
        "forward_count_ratio": (preset.steps + 1) / preset.steps,
        "peak_plain_gib": round(max(peaks["plain"]), 3), "peak_guided_gib": round(max(peaks["guided"]), 3),
        "teacher_calls_plain": calls["plain"], "teacher_calls_guided": calls["guided"], "finite": finite,
        "command": "PYTHONPATH=. python benchmarks/flow_gpu.py" + (" --tiny" if tiny else ""),
    }
    if out is not None:
        write(result, Path(out))
    return result


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "flow_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result
    (out / "flow_gpu.md").write_text(
        f"FLUX-size student (no guidance embedding) + teacher (guidance embedding), random {r['dtype']} weights, "
        f"{r['parameters_per_transformer'] / 1e9:.1f}B parameters each, {r['size']}x{r['size']}, batch {r['batch']}, "
        f"`flux_schnell({r['steps']})`, k = {r['k']}; {r['device']}, torch {r['torch']}; median of {r['repeats']} runs "
        f"(`{r['command']}`).\n\n"
        "| run | wall time (s) | peak CUDA memory (GiB) | teacher calls |\n|---|---|---|---|\n"
        f"| plain (lam = 0) | {r['plain_s']:.3f} | {r['peak_plain_gib']:.2f} | {r['teacher_calls_plain']} |\n"
        f"| guided (lam = {r['lam']}) | {r['guided_s']:.3f} | {r['peak_guided_gib']:.2f} | {r['teacher_calls_guided']} |\n\n"
        f"Guided / plain wall time: **{r['guided_over_plain']:.3f}** (the forward count alone: "
        f"{r['forward_count_ratio']:.3f}). Both transformers' weights: {r['weights_gib']:.1f} GiB, "
        f"built in {r['build_s']:.1f} s.\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="diffusers' tiny test configuration on the CPU (nothing recorded)")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: run with --tiny for a CPU smoke run", file=sys.stderr)
        return 2
    result = run(args.tiny, args.size, args.repeats, out=None if args.tiny else RESULTS)
    print(json.dumps(result, indent=2))
    ok = result["finite"] and result["teacher_calls_plain"] == 0 and result["teacher_calls_guided"] == 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
