"""A guided LoRA-student run, one shared model vs two separate models: peak memory and wall time, side by side.

    python benchmarks/lora_memory.py                      # CPU, 1 thread: peak RSS (fresh process per case), wall time
    python benchmarks/lora_memory.py --device cuda        # GPU: CUDA peak memory and wall time, full-size SDXL UNet, fp16

The student is an SDXL-architecture UNet (random weights, diffusers config) carrying a random
PEFT LoRA (rank 64 on the attention and feed-forward projections, as LCM-LoRA SDXL); the
teacher is its base. "shared": one UNet, student = adapters on, teacher = adapters off
(:class:`kdpp.diffusers.lora.SharedLoRAModel`). "separate": the student UNet with its LoRA plus a
second copy of the base as the teacher (what loading two pipelines gives). Each case runs a
guided ``generate`` (LCM-LoRA preset, 4 steps, k = 1, the preset's lam, batch 1) and reports its
peak memory (CPU: the process's peak RSS, ``ru_maxrss``, building the fp32 models included;
CUDA: ``max_memory_allocated`` during three runs after an untimed warm-up, the resident
models included) and the memory before the models were built; the printed memory ratio is
shared / separate of the peak above that baseline.

Wall time: in one process holding both pairs (the LoRA UNet, its base copy, the shared pair over
the LoRA UNet), an untimed warm-up of each, then ``--repeats`` guided runs of each, interleaved;
the medians and their ratio shared / separate. The separate pair is the plain student plus one
call of a plain base UNet, so the ratio is what the shared pair's adapter switching costs
(target: 1.05 at most). ``--time-px`` sets the image size of the timed runs (default: ``--px``;
small sizes make the per-call host overhead a larger share of a run).

Sizes: ``--size small`` (CPU default: SDXL layout at 2/5 of the channels, 4 of its 10 deepest transformer blocks, 256 px) or
``--size full`` (the SDXL base UNet config; CUDA default: 1024 px, fp16). Results are written to
``--out`` (``lora_memory[_cuda].json`` and ``.md``) with the command.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import kdpp

HERE = Path(__file__).resolve().parent
FULL = dict(block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20))
SMALL = dict(block_out_channels=(128, 256, 512), transformer_layers_per_block=(1, 2, 4), attention_head_dim=(2, 4, 8))
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def sdxl_unet(size: str, device: str, dtype: torch.dtype):
    """An SDXL-layout UNet with random weights (SDXL's text and time-id dimensions), built on ``device``."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        unet = diffusers.UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, **(FULL if size == "full" else SMALL))
    return unet.to(dtype).eval()


def add_lora(unet, rank: int = 64) -> None:
    """A random LoRA: PEFT's default init (B = 0) with B then drawn small, so the adapter changes the output."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS), adapter_name="student")
    if unet.device.type == "meta":  # structure only (the switching measurement): no values to draw
        return
    gen = torch.Generator(device=unet.device).manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, device=p.device) * 1e-3)


def rss_mib() -> float:
    """The process's resident set now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def conditioning():
    """SDXL-sized random text conditioning for one image."""
    from kdpp.diffusers.sdxl import SDXLConditioning

    gen = torch.Generator().manual_seed(2)
    return SDXLConditioning(torch.randn(1, 77, 2048, generator=gen), torch.randn(1, 77, 2048, generator=gen),
                            torch.randn(1, 1280, generator=gen), torch.randn(1, 1280, generator=gen))


def guided_run(student_model, teacher_model, px: int, device: str, dtype: torch.dtype) -> bool:
    """One guided generate: LCM-LoRA preset, 4 steps, k = 1 (4 student calls, 1 teacher call); False if not finite."""
    from kdpp.diffusers.presets import lcm_lora
    from kdpp.diffusers.sdxl import generate

    try:
        generate(student_model, teacher_model, conditioning(), lcm_lora(4), seeds=[0], height=px, width=px, k=1,
                 dtype=dtype, device=device, disable=True)
        return True
    except FloatingPointError:  # random weights may overflow fp16; memory and time are measured all the same
        return False


def run_case(case: str, size: str, device: str, px: int) -> dict:
    """Build the pair for ``case``, run a guided generate, return the peak memory.

    On CUDA an untimed warm-up run comes first, so neither case pays for initialisation.
    """
    from kdpp.diffusers.lora import SharedLoRAModel

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
    unet = sdxl_unet(size, device, dtype)
    teacher_unet = copy.deepcopy(unet) if case == "separate" else None  # the base, before the LoRA
    add_lora(unet)
    if case == "shared":
        shared = SharedLoRAModel(unet)
        student_model, teacher_model = shared.student, shared.teacher
    else:
        student_model, teacher_model = unet, teacher_unet
    models = [unet] + ([teacher_unet] if teacher_unet is not None else [])
    storages = {p.untyped_storage().data_ptr() for m in models for p in m.parameters()}
    weights = sum(p.numel() * p.element_size() for m in models for p in m.parameters()) / 2**20
    if cuda:  # warm up (CUDA context, kernels, cuBLAS workspaces), then the run's peak, resident models included
        guided_run(student_model, teacher_model, px, device, dtype)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    finite = guided_run(student_model, teacher_model, px, device, dtype)
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"case": case, "device": device, "size": size, "px": px, "baseline_mib": round(before, 1),
            "peak_mib": round(peak, 1), "peak_above_baseline_mib": round(peak - before, 1),
            "weights_mib": round(weights, 1), "parameter_storages": len(storages), "finite_output": finite}


def time_pairs(size: str, device: str, px: int, repeats: int) -> dict:
    """Median wall time of guided runs with the shared pair and with the separate pair, interleaved in one process."""
    from kdpp.diffusers.lora import SharedLoRAModel

    cuda = device == "cuda"
    dtype = torch.float16 if cuda else torch.float32
    unet = sdxl_unet(size, device, dtype)
    base = copy.deepcopy(unet)
    add_lora(unet)
    pair = SharedLoRAModel(unet)
    cases = {"shared": (pair.student, pair.teacher), "separate": (unet, base)}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(repeats + 1):  # round 0 warms both up, untimed
        for name, (student_model, teacher_model) in cases.items():
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            guided_run(student_model, teacher_model, px, device, dtype)
            if cuda:
                torch.cuda.synchronize()
            if round_:
                times[name].append(time.perf_counter() - t0)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"px": px, "repeats": repeats, "seconds": {name: round(v, 4) for name, v in medians.items()},
            "all_seconds": {name: [round(v, 4) for v in values] for name, values in times.items()},
            "ratio": medians["shared"] / medians["separate"]}


class LayersOnly(torch.nn.Module):
    """A UNet's modules, PEFT layers included, behind a forward that computes nothing: the host-side cost of a
    guided run's adapter switching, timed alone."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    @property
    def peft_config(self) -> dict:  # the loaded adapters, as on the UNet
        return self.unet.peft_config

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def switching_ms(size: str, repeats: int) -> dict:
    """Host time of one guided run's calls (student, teacher, 3 x student: LCM-LoRA 4 steps, k = 1) through the shared
    pair, as ``generate`` drives it (inside ``pair.session()`` where the package has one), minus the same five calls
    of the bare model; the UNet built on the meta device (structure and PEFT layers, no weights)."""
    from kdpp.diffusers.lora import SharedLoRAModel

    unet = sdxl_unet(size, "meta", torch.float32)
    add_lora(unet)
    model = LayersOnly(unet)
    pair = SharedLoRAModel(model)
    x = torch.zeros(())
    calls = [pair.student, pair.teacher, pair.student, pair.student, pair.student]
    session = getattr(pair, "session", contextlib.nullcontext)

    def shared() -> None:
        with session():
            for call in calls:
                call(x)

    def plain() -> None:
        for _ in calls:
            model(x)

    times: dict[str, list[float]] = {"shared": [], "plain": []}
    for round_ in range(repeats + 1):
        for name, run in (("shared", shared), ("plain", plain)):
            t0 = time.perf_counter()
            run()
            if round_:
                times[name].append(time.perf_counter() - t0)
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    layers = sum(1 for m in unet.modules() if hasattr(m, "_disable_adapters"))
    return {"size": size, "peft_layers": layers, "repeats": repeats, "shared_ms": round(ms["shared"], 3),
            "plain_ms": round(ms["plain"], 3), "switching_ms": round(ms["shared"] - ms["plain"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--size", choices=["small", "full"], help="default: small on the CPU, full on CUDA")
    p.add_argument("--px", type=int, help="image size (default: 256 on the CPU, 1024 on CUDA)")
    p.add_argument("--time-px", type=int, nargs="+", help="image size(s) of the timed runs (default: --px)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each pair (after one untimed warm-up each)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(HERE / "results"), help="folder for the results ('' for none)")
    p.add_argument("--case", choices=["shared", "separate"], help=argparse.SUPPRESS)  # a child process's one case
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    size = args.size or ("full" if args.device == "cuda" else "small")
    px = args.px or (1024 if args.device == "cuda" else 256)
    time_px = args.time_px or [px]
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if args.case:
        print(json.dumps(run_case(args.case, size, args.device, px)))
        return 0
    rows = []
    for case in ("shared", "separate"):
        if args.device == "cuda":  # the allocator's peak is reset per case: one process is enough
            rows.append(run_case(case, size, "cuda", px))
        else:  # peak RSS never goes down: a fresh process per case
            cmd = [sys.executable, __file__, "--device", "cpu", "--size", size, "--px", str(px), "--case", case,
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    timings = [time_pairs(size, args.device, tpx, args.repeats) for tpx in time_px]
    switching = switching_ms("full", 50)
    shared, separate = rows
    ratio = shared["peak_above_baseline_mib"] / separate["peak_above_baseline_mib"]
    measure = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS (ru_maxrss)"
    command = " ".join(["python benchmarks/lora_memory.py", *(sys.argv[1:] if argv is None else argv)])
    where = (torch.cuda.get_device_name() if args.device == "cuda"
             else f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s)")
    lines = [f"Command: `{command}`  ",
             f"kdpp {kdpp.__version__}, torch {torch.__version__}, {where}; {size} SDXL-layout UNet, LoRA rank 64, "
             f"LCM-LoRA preset 4 steps, k = 1 (4 student calls, 1 teacher call); memory at {px} px: {measure}.", "",
             "| case | weights MiB | parameter storages | baseline MiB | peak MiB | peak above baseline MiB | finite |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r['weights_mib']} | {r['parameter_storages']} | {r['baseline_mib']} | {r['peak_mib']} | "
                     f"{r['peak_above_baseline_mib']} | {r['finite_output']} |")
    lines += ["", f"shared / separate peak above baseline: **{ratio:.3f}**", "",
              f"Wall time, one process, {args.repeats} interleaved runs of each pair after a warm-up (median s; "
              "separate = the plain student plus one call of a plain base UNet):", "",
              "| px | shared s | separate s | shared / separate |", "|---|---|---|---|"]
    for t in timings:
        lines.append(f"| {t['px']} | {t['seconds']['shared']} | {t['seconds']['separate']} | **{t['ratio']:.3f}** |")
    lines += ["", f"Adapter switching alone, full-size SDXL UNet structure ({switching['peft_layers']} PEFT layers, "
                  f"meta device, no compute): {switching['switching_ms']} ms per guided run (shared "
                  f"{switching['shared_ms']} ms vs {switching['plain_ms']} ms for the same five calls of the bare model; "
                  f"median of {switching['repeats']})."]
    print("\n".join(lines))
    if args.out:
        stem = Path(args.out) / ("lora_memory_cuda" if args.device == "cuda" else "lora_memory")
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows, "ratio": ratio,
                                                         "timing": timings, "switching": switching}, indent=1) + "\n")
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
