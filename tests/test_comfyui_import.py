"""The node pack imports nothing of ComfyUI until ComfyUI loads it (no ComfyUI needed here)."""
import pytest

import kdpp.comfyui


def test_import_kdpp_and_kdpp_comfyui_import_no_comfy(fresh_python):
    code = ("import sys, kdpp, kdpp.comfyui, kdpp.hosts, kdpp.flow, kdpp.comfyui.__main__\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_extras', 'nodes', 'execution', 'folder_paths'))\n"
            "assert not bad, bad\n")
    run = fresh_python(["-c", code])
    assert run.returncode == 0, run.stderr


def test_install_command_writes_the_custom_nodes_shim(tmp_path, fresh_python):
    custom_nodes = tmp_path / "custom_nodes"
    custom_nodes.mkdir()
    run = fresh_python(["-m", "kdpp.comfyui", "install", str(custom_nodes)])
    assert run.returncode == 0, run.stderr
    shim = custom_nodes / "kdpp_nodes" / "__init__.py"
    assert str(shim) in run.stdout
    text = shim.read_text()
    assert "from kdpp.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS" in text
    compile(text, str(shim), "exec")
    kdpp.comfyui.install(custom_nodes)  # idempotent
    with pytest.raises(FileNotFoundError, match="custom_nodes='.*missing'"):
        kdpp.comfyui.install(tmp_path / "missing")


def test_install_command_refuses_what_is_not_a_custom_nodes_folder(tmp_path, capsys):
    """The ComfyUI root gets the right path offered; a missing path or another folder a one-line error, no traceback."""
    from kdpp.comfyui.__main__ import main

    (tmp_path / "custom_nodes").mkdir()
    other = tmp_path / "nodes"
    other.mkdir()
    for path, message in [(tmp_path, f"install into {str(tmp_path / 'custom_nodes')!r}"),
                          (tmp_path / "missing", "is not a directory"), (other, "is not a ComfyUI custom_nodes folder")]:
        with pytest.raises(SystemExit) as exit:
            main(["install", str(path)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and err.count("\n") == 1  # one line, exit status 2
    assert not (other / "kdpp_nodes").exists() and not (tmp_path / "kdpp_nodes").exists()
    main(["install", str(other), "--force"])
    assert (other / "kdpp_nodes" / "__init__.py").is_file()
