"""``python -m kdpp.comfyui install CUSTOM_NODES_DIR``: write the ComfyUI custom-node shim."""
from __future__ import annotations

import argparse

from . import install


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kdpp.comfyui", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("install", help="write custom_nodes/kdpp_nodes/__init__.py")
    cmd.add_argument("custom_nodes", help="ComfyUI's custom_nodes folder")
    cmd.add_argument("--force", action="store_true", help="accept a custom-nodes folder not named custom_nodes")
    args = parser.parse_args(argv)
    try:
        target = install(args.custom_nodes, force=args.force)
    except (OSError, ValueError) as e:
        parser.exit(2, f"{parser.prog} install: error: {e}\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
