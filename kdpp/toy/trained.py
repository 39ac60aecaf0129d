"""A small MLP consistency student distilled from the exact ring teacher (weights ship with kdpp).

Retrain with ``python benchmarks/train_toy_student.py`` (see docs/toy.md for the time it takes): it writes into a
new temporary folder unless ``--out PATH`` is given, and replaces this file only with
``--out kdpp/toy/ring_cd_student.pt --overwrite``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

WEIGHTS = Path(__file__).with_name("ring_cd_student.pt")


class MLPConsistencyStudent(nn.Module):
    r"""``f(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, log(sigma) / 4)``.

    The consistency-model parameterisation (Song et al. 2023): ``f(x, sigma_min) = x``
    exactly, so the network learns an endpoint predictor of the PF-ODE. It is a
    VE denoiser-shaped callable ``student(x, sigma_batch)`` usable with every kdpp sampler.
    """

    def __init__(self, d: int = 2, hidden: int = 128, depth: int = 3, sigma_data: float = 4.0, sigma_min: float = 0.002):
        super().__init__()
        self.config = {"d": d, "hidden": hidden, "depth": depth, "sigma_data": sigma_data, "sigma_min": sigma_min}
        layers, width = [], d + 1
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        self.net = nn.Sequential(*layers, nn.Linear(width, d))
        self.sigma_data, self.sigma_min = sigma_data, sigma_min

    def forward(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, 1).expand(x.shape[0], 1)
        sd, eps = self.sigma_data, self.sigma_min
        c_skip = sd**2 / ((s - eps) ** 2 + sd**2)
        c_out = (s - eps) * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        w = next(self.parameters())
        h = torch.cat([c_in * x, s.log() / 4], 1).to(w.dtype)
        return c_skip * x + c_out * self.net(h).to(x.dtype)


def load_trained_student(path: str | Path = WEIGHTS) -> MLPConsistencyStudent:
    """The shipped (or a retrained) student, in eval mode, float64."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    model = MLPConsistencyStudent(**blob["config"]).double()
    model.load_state_dict(blob["state_dict"])
    return model.eval().requires_grad_(False)
