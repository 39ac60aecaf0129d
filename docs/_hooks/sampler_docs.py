"""griffe extension: the samplers' docstrings as ``help()`` shows them, without importing the whole package.

Each kdpp sampler's docstring holds an ``{args}`` placeholder that ``kdpp.solvers._run.documented`` fills with
the arguments every sampler shares when the module is imported. The API page reads the code statically (so
constants and dataclass fields show their own text, not the docstrings of ``float`` or ``dict``); this
extension replaces just those placeholder docstrings with the filled ones of the imported functions.
"""
from __future__ import annotations

import importlib
from typing import Any

import griffe


class SamplerDocstrings(griffe.Extension):
    def on_function_instance(self, *, func: griffe.Function, **kwargs: Any) -> None:
        if func.docstring is None or "{args}" not in func.docstring.value:
            return
        runtime = getattr(importlib.import_module(func.module.path), func.name)
        func.docstring.value = runtime.__doc__
