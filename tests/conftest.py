import importlib
import importlib.util
import os
import sys
import types
from importlib.machinery import ModuleSpec

import pytest
import torch

THREADS = int(os.environ.get("KDPP_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def _suite_threads():
    """Every test runs on the suite's torch threads, even after one ran a script that sets its own."""
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


def _expose_kdiffusion_sampling() -> None:
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


_expose_kdiffusion_sampling()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none found)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class Recorder:
    """Wraps a denoiser and records every call's sigma and input."""

    def __init__(self, fn):
        self.fn, self.sigmas, self.inputs = fn, [], []

    def __call__(self, x, sigma, **extra):
        self.sigmas.append(float(sigma[0]))
        self.inputs.append(x.clone())
        return self.fn(x, sigma, **extra)

    @property
    def calls(self):
        return len(self.sigmas)


def nonlinear_denoiser(x, sigma, **extra):
    """A smooth, non-linear stand-in model (the oracle tests need no exact one)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return x / (1 + s**2) + 0.3 * torch.sin(x) / (1 + s)


def other_denoiser(x, sigma, **extra):
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return 0.8 * x / (1 + s**2) - 0.2 * torch.tanh(x) / (1 + s)


@pytest.fixture
def schedule():
    return torch.tensor([14.6, 7.0, 3.1, 1.2, 0.45, 0.1, 0.0], dtype=torch.float64)


@pytest.fixture(scope="session")
def fresh_python():
    """``fresh_python(["-c", code, *argv])`` / ``fresh_python(["-m", module, *argv])``: a fresh interpreter's run
    (tests/fresh_python.py), as ``subprocess.run(..., capture_output=True, text=True)`` returns it."""
    from fresh_python import FreshPython

    runner = FreshPython()
    yield runner.run
    runner.close()
