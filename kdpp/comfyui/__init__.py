"""Distillation++ nodes for ComfyUI.

With kdpp installed in the Python that runs ComfyUI (the ComfyUI page of the docs, "Install")::

    python -m kdpp.comfyui install /path/to/ComfyUI/custom_nodes

writes ``custom_nodes/kdpp_nodes/__init__.py``, a two-line shim that imports
:mod:`kdpp.comfyui.nodes` when ComfyUI loads its custom nodes. ``import kdpp`` and
``import kdpp.comfyui`` import nothing of ComfyUI; :mod:`kdpp.comfyui.nodes` and
:mod:`kdpp.comfyui.sampling` do, and are only imported by ComfyUI. ``import kdpp.comfyui``
registers ComfyUI's host conventions (:mod:`kdpp.comfyui.host`) with :mod:`kdpp.hosts`, so kdpp
samplers registered into ``comfy.k_diffusion.sampling`` with :func:`kdpp.hosts.register` follow
ComfyUI's seeding and flow frames as the nodes do.
"""
from __future__ import annotations

from pathlib import Path

from ..hosts import register_host
from .host import COMFYUI

register_host(COMFYUI)

#: the folder the shim is written to, under ComfyUI's ``custom_nodes``
SHIM_NAME = "kdpp_nodes"
SHIM = '''"""Distillation++ nodes (written by `python -m kdpp.comfyui install`; the code lives in the kdpp package)."""
from kdpp.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def install(custom_nodes: str | Path, force: bool = False) -> Path:
    """Write the ``kdpp_nodes`` shim into ComfyUI's ``custom_nodes`` folder; returns the file written.

    The folder must exist and be named ``custom_nodes`` (ComfyUI's own, ``ComfyUI/custom_nodes``);
    ``force=True`` accepts a folder of another name (an extra custom-nodes path of
    ``extra_model_paths.yaml``). A ComfyUI root is refused with the right path in the message.
    """
    custom_nodes = Path(custom_nodes)
    if not custom_nodes.is_dir():
        raise FileNotFoundError(f"custom_nodes={str(custom_nodes)!r} is not a directory (ComfyUI's custom_nodes folder)")
    if not force and custom_nodes.resolve().name != "custom_nodes":
        inside = custom_nodes / "custom_nodes"
        hint = (f"; this looks like the ComfyUI folder: install into {str(inside)!r}" if inside.is_dir() else
                " (ComfyUI/custom_nodes; for another custom-nodes folder, force=True / --force)")
        raise ValueError(f"custom_nodes={str(custom_nodes)!r} is not a ComfyUI custom_nodes folder{hint}")
    target = custom_nodes / SHIM_NAME / "__init__.py"
    target.parent.mkdir(exist_ok=True)
    target.write_text(SHIM)
    return target
