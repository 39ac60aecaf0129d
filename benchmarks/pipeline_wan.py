"""Wan 2.1 text-to-video at a small size through the Distillation++ pipeline: guided vs plain wall time, side by side.

    python benchmarks/pipeline_wan.py        # CPU, 1 thread

A small WanTransformer3DModel (Wan 2.1's layout: patch (1, 2, 2), 16 latent channels, RMS qk-norm; 8 layers, 8 heads
of 32, FFN 1024; random weights) carrying a random rank-16 PEFT LoRA on its attention projections (the
step-distilled student, lightx2v-style); the teacher is the same transformer with the LoRA off, CFG 5
(``SharedLoRAModel``: one model in memory). 256 x 256 px, 9 frames (latents [16, 3, 32, 32]: 768 tokens), one video,
the lightx2v 4-step preset; ``prompt_embeds`` / ``negative_prompt_embeds`` given (no text encoder) and
``output_type="latent"`` (no VAE): the figures are the denoising loop's.

Cases, timed interleaved after a warm-up of each, ``--repeats`` times (median seconds; ratios are medians of the
per-repeat ratios to the ``WanPipeline`` run of the same repeat):

- ``WanPipeline``: diffusers' pipeline with the LoRA active and the recipe's scheduler (FlowMatchEulerDiscreteScheduler,
  shift 5, stochastic sampling, at the recipe's linear sigmas), guidance_scale 1: plain lightx2v;
- ``kdpp lam=0``: ``WanDistPPPipeline`` at ``lam=0`` (no teacher call): the pipeline's own overhead;
- ``kdpp k=1`` / ``k=2``: guided on the first one / two steps (each guided step: one teacher call of a CFG batch of 2).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import kdpp  # noqa: E402

WAN = dict(patch_size=(1, 2, 2), num_attention_heads=8, attention_head_dim=32, in_channels=16, out_channels=16,
           text_dim=64, freq_dim=256, ffn_dim=1024, num_layers=8, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
           rope_max_seq_len=1024)
SIZE = dict(height=256, width=256, num_frames=9)


def recipe_scheduler():
    """diffusers' FlowMatchEulerDiscreteScheduler at the lightx2v recipe's sigmas (linspace(1, 1/N, N), shift 5,
    stochastic steps): WanPipeline calls set_timesteps(N) without sigmas, so they are set here."""
    import diffusers

    class RecipeScheduler(diffusers.FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **kwargs):
            super().set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps), device=device)

    return RecipeScheduler(shift=5.0, stochastic_sampling=True)


def build():
    import diffusers
    from peft import LoraConfig

    from kdpp.diffusers.lora import SharedLoRAModel
    from kdpp.diffusers.pipelines import WanDistPPPipeline

    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(**WAN).eval()
    model.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights=False,
                                 target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="lightx2v")
    pipe = diffusers.WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=recipe_scheduler(),
                                 transformer=model)
    pipe.set_progress_bar_config(disable=True)
    kd = WanDistPPPipeline.from_pipe(pipe, teacher=SharedLoRAModel(model))
    g = torch.Generator().manual_seed(1)
    embeds = dict(prompt_embeds=torch.randn(1, 32, WAN["text_dim"], generator=g),
                  negative_prompt_embeds=torch.randn(1, 32, WAN["text_dim"], generator=g))
    common = dict(**embeds, **SIZE, num_inference_steps=4, output_type="latent")
    return {
        "WanPipeline": lambda: pipe(**common, guidance_scale=1.0, generator=torch.Generator().manual_seed(2)).frames,
        "kdpp lam=0": lambda: kd(**common, lam=0.0, generator=torch.Generator().manual_seed(2)).frames,
        "kdpp k=1": lambda: kd(**common, lam=0.5, k=1, generator=torch.Generator().manual_seed(2)).frames,
        "kdpp k=2": lambda: kd(**common, lam=0.5, k=2, generator=torch.Generator().manual_seed(2)).frames,
    }, model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each case (after a warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the results ('' for none)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases, model = build()
    calls = []
    model.register_forward_pre_hook(lambda module, a: calls.append(1))
    finite, model_calls = {}, {}
    for name, run in cases.items():  # warm-up, and the model calls of each case
        calls.clear()
        finite[name] = bool(torch.isfinite(run()).all())
        model_calls[name] = len(calls)
    seconds = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, run in cases.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    base = seconds["WanPipeline"]
    rows = []
    for name, times in seconds.items():
        ratios = [t / b for t, b in zip(times, base)]
        plain = [t / b for t, b in zip(times, seconds["kdpp lam=0"])]
        rows.append({"case": name, "median_s": round(statistics.median(times), 4), "model_calls": model_calls[name],
                     "vs_wan_pipeline": round(statistics.median(ratios), 3),
                     "vs_kdpp_plain": round(statistics.median(plain), 3), "finite": finite[name]})
    command = " ".join(["python benchmarks/pipeline_wan.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [f"Command: `{command}`  ",
             f"kdpp {kdpp.__version__}, torch {torch.__version__}, {platform.machine()} CPU, {args.threads} thread(s); "
             f"small Wan 2.1-layout transformer ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters "
             f"with the LoRA), {SIZE['height']} x {SIZE['width']} px, {SIZE['num_frames']} frames, lightx2v preset "
             f"(4 steps), teacher = the same transformer with the LoRA off, CFG 5; {args.repeats} interleaved timed "
             "runs per case after a warm-up (median; ratios: median of the per-repeat ratios).", "",
             "| case | transformer calls | median s | / WanPipeline | / kdpp lam=0 | finite |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['model_calls']} | {r['median_s']} | **{r['vs_wan_pipeline']:.3f}** | "
                     f"{r['vs_kdpp_plain']:.3f} | {r['finite']} |")
    print("\n".join(lines))
    if args.out:
        stem = Path(args.out) / "pipeline_wan"
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "seconds": seconds},
                                                        indent=1) + "\n")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
