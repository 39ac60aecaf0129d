"""``import k_diffusion.sampling`` without torchvision: the test oracle and the benchmarks that compare with it.

Shared by ``tests/conftest.py`` and the benchmark scripts that time or check kdpp against k-diffusion
(``performance.py``, ``wrapper_vs_paper.py``), so they run in the README's test environment, where
k-diffusion is installed with ``--no-deps``.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from importlib.machinery import ModuleSpec


def expose_kdiffusion_sampling() -> None:
    """Make ``import k_diffusion.sampling`` (the test oracle) work without torchvision.

    k-diffusion's package ``__init__`` imports its training and evaluation tools (CLIP, clean-fid,
    torchvision), and PyPI's torchvision build needs a CUDA torch, so the test environment installs
    k-diffusion without its dependencies (README). Where its ``__init__`` cannot import, the package
    is registered without running it and ``k_diffusion.sampling`` is imported here, with an empty
    ``torchvision.transforms.functional`` standing in for the one module-level import of
    ``k_diffusion.utils`` that ``sampling`` never calls. The stand-in is removed again right after:
    left in ``sys.modules`` it would tell transformers that torchvision is installed (its image
    utilities then fail to import, and diffusers' UNets with them). The samplers themselves are
    k-diffusion's own code, unchanged.
    """
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or "k_diffusion" in sys.modules:
        return
    try:
        importlib.import_module("k_diffusion")
        return
    except ImportError:
        for name in [n for n in sys.modules if n == "k_diffusion" or n.startswith("k_diffusion.")]:
            del sys.modules[name]
    package = types.ModuleType("k_diffusion")
    package.__path__, package.__spec__ = list(spec.submodule_search_locations), spec
    sys.modules["k_diffusion"] = package
    stubs = ()
    if importlib.util.find_spec("torchvision") is None:
        stubs = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
        for name in stubs:
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__spec__ = ModuleSpec(name, None)
        sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
        sys.modules["torchvision.transforms"].functional = sys.modules["torchvision.transforms.functional"]
    try:
        importlib.import_module("k_diffusion.sampling")
    except ImportError:  # a missing dependency of its own: the oracle tests skip, naming it
        pass
    finally:
        for name in stubs:
            del sys.modules[name]
