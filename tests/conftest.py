import os
import sys
from pathlib import Path

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


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _kdiffusion import expose_kdiffusion_sampling  # noqa: E402

expose_kdiffusion_sampling()


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
