"""The shipped MLP consistency student."""
import importlib.util
import pathlib

import pytest
import torch

import kdpp
from kdpp.toy import ring
from kdpp.toy.trained import load_trained_student

MIX = ring()


def test_shipped_student_is_a_consistency_function():
    student = load_trained_student()
    x = torch.randn(500, 2, dtype=torch.float64) * 3
    torch.testing.assert_close(student(x, torch.full((500,), 0.002, dtype=torch.float64)), x)  # boundary condition
    # measured (docs/toy.md): mean endpoint error 0.10 at sigma 0.2 rising to 0.95 at 14.6; the
    # posterior mean D(x, sigma) is the better endpoint below sigma ~ 1.5, the student above
    # the flow map at 8 RK4 steps per unit of log sigma: within 1e-3 of the default's (errors compared: 0.1 .. 3)
    for sigma in (2.0, 4.0, 8.0, 14.6):
        noise = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        xs = MIX.sample(500, torch.Generator().manual_seed(0)) + sigma * noise
        exact = MIX.flow_map(xs, sigma, 0.0, steps_per_unit=8)
        s = torch.full((500,), sigma, dtype=torch.float64)
        err = (student(xs, s) - exact).norm(dim=1).mean()
        mean_err = (MIX.denoiser(xs, s) - exact).norm(dim=1).mean()  # the one-step posterior mean
        assert err < min(mean_err, 1.0), (sigma, float(err), float(mean_err))


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m", "lcm"])
def test_trained_student_runs_in_every_sampler(name):
    x = torch.randn(64, 2, dtype=torch.float64) * 14.6
    out = kdpp.SAMPLERS[name](load_trained_student(), MIX.denoiser, x, [14.6, 4.1, 1.6, 0.7, 0.0], 0.8, 1, disable=True)
    assert out.shape == x.shape and bool(torch.isfinite(out).all())


def test_training_script_reduces_the_loss(tmp_path, capsys, monkeypatch):
    """The shipped training script, on a small step budget: the loss falls and the weights load.

    The script sets two torch threads for a standalone run; inside the suite it keeps the suite's.
    """
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / "train_toy_student.py"
    spec = importlib.util.spec_from_file_location("train_toy_student", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    module.main(["--iters", "300", "--batch", "256", "--out", str(tmp_path / "s.pt")])
    losses = [float(line.split()[3]) for line in capsys.readouterr().out.splitlines() if line.startswith("iter")]
    assert losses[-1] < losses[0] / 3
    assert isinstance(load_trained_student(tmp_path / "s.pt"), torch.nn.Module)
