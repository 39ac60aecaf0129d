"""MkDocs hook: the built site serves MathJax itself, so its formulas render without a network.

MathJax 3 comes from PyPI: the ``django-static-mathjax`` wheel carries MathJax's own ``es5``
build under ``mathjax/static/mathjax/es5`` (installed by ``pip install -e '.[docs]'``). The
``tex-mml-chtml`` component that ``mkdocs.yml`` loads, and the files it may load at run time,
are added to the site under ``assets/mathjax/``; MathJax finds them relative to its own script.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

DEST = "assets/mathjax"
# the component; the TeX extensions it autoloads; the CHTML output's fonts; the menu; the
# accessibility and speech modules the menu can switch on
PARTS = ("tex-mml-chtml.js", "input", "output/chtml", "ui", "a11y", "sre")


def mathjax_es5() -> Path:
    """The installed MathJax ``es5`` folder (a clear error when the docs extra is missing)."""
    spec = importlib.util.find_spec("mathjax")
    root = Path(spec.origin).parent / "static" / "mathjax" / "es5" if spec and spec.origin else None
    if root is None or not (root / "tex-mml-chtml.js").is_file():
        raise PluginError("MathJax is not installed: pip install -e '.[docs]' (its django-static-mathjax package "
                          "ships MathJax 3, which the site serves itself)")
    return root


def on_files(files: Files, config: MkDocsConfig) -> Files:
    root = mathjax_es5()
    for part in PARTS:
        path = root / part
        for f in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            files.append(File.generated(config, f"{DEST}/{f.relative_to(root).as_posix()}", abs_src_path=str(f)))
    return files
