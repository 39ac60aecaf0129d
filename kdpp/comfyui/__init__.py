"""Distillation++ nodes for ComfyUI.

Install (one step, with ComfyUI's Python)::

    pip install kdpp && python -m kdpp.comfyui install /path/to/ComfyUI/custom_nodes

which writes ``custom_nodes/kdpp_nodes/__init__.py``, a two-line shim that imports
:mod:`kdpp.comfyui.nodes` when ComfyUI loads its custom nodes. ``import kdpp`` and
``import kdpp.comfyui`` import nothing of ComfyUI; :mod:`kdpp.comfyui.nodes` and
:mod:`kdpp.comfyui.sampling` do, and are only imported by ComfyUI.
"""
from __future__ import annotations

from pathlib import Path

#: the folder the shim is written to, under ComfyUI's ``custom_nodes``
SHIM_NAME = "kdpp_nodes"
SHIM = '''"""Distillation++ nodes (written by `python -m kdpp.comfyui install`; the code lives in the kdpp package)."""
from kdpp.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''


def install(custom_nodes: str | Path) -> Path:
    """Write the ``kdpp_nodes`` shim into ComfyUI's ``custom_nodes`` folder; returns the file written."""
    custom_nodes = Path(custom_nodes)
    if not custom_nodes.is_dir():
        raise FileNotFoundError(f"custom_nodes={str(custom_nodes)!r} is not a directory (ComfyUI's custom_nodes folder)")
    target = custom_nodes / SHIM_NAME / "__init__.py"
    target.parent.mkdir(exist_ok=True)
    target.write_text(SHIM)
    return target
