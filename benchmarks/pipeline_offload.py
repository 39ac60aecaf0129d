"""A FLUX-shaped Distillation++ pipeline at 1024 px in bfloat16 with the teacher offloaded: peak GPU memory and wall time
against plain FLUX.1-schnell, side by side.

    python benchmarks/pipeline_offload.py            # CUDA: FLUX.1's transformer config (random bf16 weights), 1024 px
    python benchmarks/pipeline_offload.py --smoke    # CPU: a tiny FLUX config at 64 px; checks the logic, no memory figures
    python benchmarks/pipeline_offload.py --smoke --out benchmarks/results    # the committed smoke record

Student: a FluxTransformer2DModel of FLUX.1-schnell's shape (19 double + 38 single blocks, 3072 wide; no guidance
embedding); teacher: one of FLUX.1-dev's shape (with the guidance embedding). Random weights (nothing is
downloaded); no text encoders or VAE: both pipelines get the same random ``prompt_embeds`` ([1, 512, 4096]) and
``pooled_prompt_embeds`` and return ``output_type="latent"``, so the figures are the denoising loop's. 4 steps
(schnell's preset), one image, ``lam = 0.5`` on the first step (``k = 1``: 4 student calls, 1 teacher call).

Two processes (the offloading hooks of one case cannot be taken off for the other):

1. ``group``: ``FluxPipeline`` (plain schnell, the student resident on the GPU) and ``FluxDistPPPipeline`` sharing
   its student, with the teacher in CPU memory under diffusers' block-level group offloading (one block per
   group; CUDA streams where there is a GPU): the teacher's blocks visit the GPU one at a time, only during its
   call. Timed runs interleaved, after a warm-up of each.
2. ``model``: plain schnell resident, timed; then ``FluxDistPPPipeline.enable_model_cpu_offload()``: student and
   teacher both live in CPU memory and move whole to the GPU for their calls, the student leaving before the
   teacher comes (the pipeline's TeacherCall) and the teacher after its call.

Memory (CUDA): ``torch.cuda.max_memory_allocated`` over the timed runs of a case (peak statistics reset before
each case). The target: a guided run's peak within one transformer + activations + 1 GiB, where "one transformer"
is the student's weight bytes and "activations" is the plain run's peak minus them (both measured here). Results:
``--out`` (``pipeline_offload[_smoke].json`` / ``.md``), with the command: by default benchmarks/results, and for
``--smoke`` a new temporary folder (printed), so a trial run replaces no committed result; with no CUDA device and
no ``--smoke`` the script records "not measured: no GPU" and exits.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import kdpp  # noqa: E402

#: FluxTransformer2DModel's FLUX.1 configuration (its defaults: black-forest-labs/FLUX.1-schnell and -dev)
FLUX1 = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
             num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
#: diffusers' FluxTransformer2DModel test configuration
SMOKE = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8))
GIB = 2**30


def transformer(config: dict, guidance_embeds: bool, device: str, dtype: torch.dtype, seed: int):
    """A FluxTransformer2DModel with random weights, created on ``device`` directly in ``dtype``."""
    import diffusers

    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = diffusers.FluxTransformer2DModel(**config, guidance_embeds=guidance_embeds)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


class Setup:
    """The student pipeline, the Distillation++ pipeline sharing its student, and the runs' arguments."""

    def __init__(self, smoke: bool):
        import diffusers

        from kdpp.diffusers.flow_presets import FLUX_SCHNELL_SCHEDULER
        from kdpp.diffusers.pipelines import FluxDistPPPipeline

        self.device = "cpu" if smoke else "cuda"
        self.dtype = torch.float32 if smoke else torch.bfloat16
        config = SMOKE if smoke else FLUX1
        self.px = 64 if smoke else 1024
        self.student = transformer(config, False, self.device, self.dtype, 0)
        self.teacher = transformer(config, True, self.device, self.dtype, 1).to("cpu")
        if self.device == "cuda":
            torch.cuda.empty_cache()
        self.pipe = diffusers.FluxPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX_SCHNELL_SCHEDULER), vae=None, text_encoder=None,
            tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=self.student)
        self.pipe.set_progress_bar_config(disable=True)
        self.kd = FluxDistPPPipeline.from_pipe(self.pipe, teacher=self.teacher)
        g = torch.Generator().manual_seed(0)
        self.embeds = dict(
            prompt_embeds=torch.randn(1, 512, config["joint_attention_dim"], generator=g).to(self.device, self.dtype),
            pooled_prompt_embeds=torch.randn(1, config["pooled_projection_dim"], generator=g).to(self.device, self.dtype))
        self.teacher_calls = 0
        self.teacher.register_forward_pre_hook(lambda module, args: setattr(self, "teacher_calls", self.teacher_calls + 1))

    def args(self) -> dict:
        return dict(**self.embeds, height=self.px, width=self.px, num_inference_steps=4, output_type="latent",
                    generator=torch.Generator().manual_seed(1))

    def plain(self) -> torch.Tensor:
        return self.pipe(**self.args(), guidance_scale=0.0).images

    def guided(self) -> torch.Tensor:
        return self.kd(**self.args(), lam=0.5, k=1).images

    def timed(self, run) -> tuple[float, bool]:
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = run()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, bool(torch.isfinite(out).all())


def peak_reset(setup: Setup) -> None:
    if setup.device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(setup: Setup) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GIB, 3) if setup.device == "cuda" else None


def run_group(smoke: bool, repeats: int) -> dict:
    """Plain schnell (student resident) and the guided pipeline with the teacher group-offloaded, interleaved."""
    setup = Setup(smoke)
    onload = torch.device(setup.device)
    setup.teacher.enable_group_offload(onload_device=onload, offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1,
                                       use_stream=setup.device == "cuda")
    cases = {"plain": setup.plain, "guided_group_offload": setup.guided}
    for run in cases.values():  # warm-up
        run()
    seconds, peaks, finite = {name: [] for name in cases}, {}, {}
    for name, run in cases.items():
        peak_reset(setup)
        finite[name] = setup.timed(run)[1]
        peaks[name] = peak_gib(setup)
    calls_before = setup.teacher_calls
    for _ in range(repeats):
        for name, run in cases.items():
            seconds[name].append(setup.timed(run)[0])
    return {"student_gib": round(nbytes(setup.student) / GIB, 3), "peak_gib": peaks, "finite": finite,
            "seconds": seconds, "teacher_calls_per_guided_run": (setup.teacher_calls - calls_before) / repeats,
            "teacher_on": str(next(setup.teacher.parameters()).device)}


def run_model(smoke: bool, repeats: int) -> dict:
    """Plain schnell (student resident), then the guided pipeline under enable_model_cpu_offload."""
    setup = Setup(smoke)
    seconds, peaks, finite = {}, {}, {}
    setup.plain()
    peak_reset(setup)
    finite["plain"] = setup.timed(setup.plain)[1]
    peaks["plain"] = peak_gib(setup)
    seconds["plain"] = [setup.timed(setup.plain)[0] for _ in range(repeats)]
    setup.kd.enable_model_cpu_offload(device=setup.device)
    setup.guided()
    peak_reset(setup)
    finite["guided_model_offload"] = setup.timed(setup.guided)[1]
    peaks["guided_model_offload"] = peak_gib(setup)
    calls_before = setup.teacher_calls
    seconds["guided_model_offload"] = [setup.timed(setup.guided)[0] for _ in range(repeats)]
    return {"student_gib": round(nbytes(setup.student) / GIB, 3), "peak_gib": peaks, "finite": finite,
            "seconds": seconds, "teacher_calls_per_guided_run": (setup.teacher_calls - calls_before) / repeats,
            "teacher_on": str(next(setup.teacher.parameters()).device)}


def summarize(result: dict, case: str) -> dict:
    plain = statistics.median(result["seconds"]["plain"])
    guided = statistics.median(result["seconds"][case])
    row = {"case": case, "plain_s": round(plain, 4), "guided_s": round(guided, 4), "ratio": round(guided / plain, 3),
           "teacher_calls": result["teacher_calls_per_guided_run"], "finite": result["finite"][case]}
    peak_plain, peak_guided = result["peak_gib"]["plain"], result["peak_gib"][case]
    if peak_plain is not None:
        weights = result["student_gib"]
        row.update(weights_gib=weights, activations_gib=round(peak_plain - weights, 3), plain_peak_gib=peak_plain,
                   guided_peak_gib=peak_guided, bound_gib=round(peak_plain + 1.0, 3),
                   within_bound=peak_guided <= peak_plain + 1.0)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny FLUX config at 64 px: the logic, no memory figures")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each case (after a warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU (default 1)")
    p.add_argument("--out", default=None, help="folder for the results (default: benchmarks/results; with --smoke a "
                   "new temporary folder; '' for none)")
    p.add_argument("--case", choices=["group", "model"], help=argparse.SUPPRESS)  # a child process's case
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/pipeline_offload.py", *(sys.argv[1:] if argv is None else argv)])
    if args.case:
        run = run_group if args.case == "group" else run_model
        print(json.dumps(run(args.smoke, args.repeats)))
        return 0
    if args.out is None:
        args.out = tempfile.mkdtemp(prefix="kdpp-pipeline-offload-smoke-") if args.smoke else str(HERE / "results")
    stem = Path(args.out) / ("pipeline_offload_smoke" if args.smoke else "pipeline_offload") if args.out else None
    if not args.smoke and not torch.cuda.is_available():
        lines = [f"Command: `{command}`  ", "Not measured: no GPU (CUDA) lent to this run; "
                 "`--smoke` checks the benchmark's logic on the CPU."]
        print("\n".join(lines))
        if stem is not None:
            stem.parent.mkdir(parents=True, exist_ok=True)
            stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
            stem.with_suffix(".json").write_text(json.dumps({"command": command, "measured": False}, indent=1) + "\n")
        return 0
    results = {}
    for case in ("group", "model"):
        cmd = [sys.executable, __file__, "--case", case, "--repeats", str(args.repeats), "--threads", str(args.threads)]
        out = subprocess.run(cmd + (["--smoke"] if args.smoke else []), check=True, capture_output=True, text=True)
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
    rows = [summarize(results["group"], "guided_group_offload"), summarize(results["model"], "guided_model_offload")]
    where = (f"{torch.cuda.get_device_name()}, bfloat16, FLUX.1 transformer shape ({results['group']['student_gib']} "
             "GiB of weights each), 1024 px" if not args.smoke else
             f"{platform.machine()} CPU, {args.threads} thread(s), float32, FLUX test config, 64 px (smoke: no memory figures)")
    lines = [f"Command: `{command}`  ", f"kdpp {kdpp.__version__}, torch {torch.__version__}; {where}; 4 steps, 1 image, "
             f"lam 0.5, k = 1; median of {args.repeats} timed runs per case after a warm-up.", ""]
    head = "| case | plain s | guided s | guided / plain | teacher calls per run | finite |"
    lines += [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['plain_s']} | {r['guided_s']} | **{r['ratio']:.3f}** | {r['teacher_calls']:g} "
                     f"| {r['finite']} |")
    if not args.smoke:
        lines += ["", "| case | student weights GiB | activations GiB (plain peak - weights) | plain peak GiB | "
                      "guided peak GiB | bound GiB (weights + activations + 1) | within |", "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['case']} | {r['weights_gib']} | {r['activations_gib']} | {r['plain_peak_gib']} | "
                         f"{r['guided_peak_gib']} | {r['bound_gib']} | **{r['within_bound']}** |")
    print("\n".join(lines))
    if stem is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({"command": command, "results": results, "rows": rows},
                                                        indent=1) + "\n")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        print(f"wrote {stem}.md/.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
