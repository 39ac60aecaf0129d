"""The node pack imports nothing of ComfyUI until ComfyUI loads it (no ComfyUI needed here)."""
import subprocess
import sys
from pathlib import Path

import pytest

import kdpp.comfyui

ROOT = Path(__file__).resolve().parent.parent


def test_import_kdpp_and_kdpp_comfyui_import_no_comfy():
    code = ("import sys, kdpp, kdpp.comfyui, kdpp.hosts, kdpp.flow, kdpp.comfyui.__main__\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_extras', 'nodes', 'execution', 'folder_paths'))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_install_command_writes_the_custom_nodes_shim(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kdpp.comfyui", "install", str(tmp_path)], check=True, cwd=ROOT,
                         capture_output=True, text=True).stdout
    shim = tmp_path / "kdpp_nodes" / "__init__.py"
    assert str(shim) in out
    text = shim.read_text()
    assert "from kdpp.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS" in text
    compile(text, str(shim), "exec")
    kdpp.comfyui.install(tmp_path)  # idempotent
    with pytest.raises(FileNotFoundError, match="custom_nodes='.*missing'"):
        kdpp.comfyui.install(tmp_path / "missing")
