"""``python -m kdpp.comfyui install CUSTOM_NODES_DIR``: write the ComfyUI custom-node shim."""
from __future__ import annotations

import argparse

from . import install


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdpp.comfyui", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("install", help="write custom_nodes/kdpp_nodes/__init__.py")
    cmd.add_argument("custom_nodes", help="ComfyUI's custom_nodes folder")
    args = parser.parse_args(argv)
    print(f"wrote {install(args.custom_nodes)}")


if __name__ == "__main__":
    main()
