r"""The learned testbed's networks: an EDM-preconditioned residual MLP and the digits classifier.

Every diffusion net here is a VE denoiser ``D(x, sigma, class_labels=None) -> x0`` usable with
every kdpp sampler; ``class_labels`` (``[B]`` ints, ``10`` = unconditional, ``None`` = all
unconditional) selects the class. The teacher was trained with label dropout, so
``kdpp.CFGDenoiser(teacher, scale=w, cond_key="class_labels")`` is its classifier-free-guided form.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .data import DIM, N_CLASSES, NULL_CLASS


class EDMDenoiser(nn.Module):
    r"""``D(x, s) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s), class)`` (Karras et al. 2022, EDM).

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``,
    ``c_in = 1 / sqrt(s^2 + sd^2)``, ``c_noise = log(s) / 4``. ``F`` is a residual MLP
    (pre-LayerNorm blocks ``h + W2 SiLU(W1 SiLU(LN(h) + e))``) whose embedding ``e`` sums
    Fourier features of ``c_noise`` and a learned class embedding (11 rows: 10 classes and the
    null class).
    """

    def __init__(self, hidden: int = 256, blocks: int = 3, sigma_data: float = 0.5, fourier: int = 16):
        super().__init__()
        self.config = {"hidden": hidden, "blocks": blocks, "sigma_data": sigma_data, "fourier": fourier}
        self.sigma_data = sigma_data
        self.register_buffer("freqs", torch.exp(torch.linspace(0, math.log(64), fourier)), persistent=False)
        self.noise_embed = nn.Sequential(nn.Linear(2 * fourier, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_embed = nn.Embedding(N_CLASSES + 1, hidden)
        self.inp = nn.Linear(DIM, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(blocks))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, DIM))

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None) -> Tensor:
        w = self.inp.weight
        s = torch.as_tensor(sigma, device=x.device).reshape(-1, 1).expand(x.shape[0], 1).to(torch.float64)
        sd = self.sigma_data
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / (s**2 + sd**2).sqrt()
        c_in = 1 / (s**2 + sd**2).sqrt()
        if class_labels is None:
            class_labels = torch.full((x.shape[0],), NULL_CLASS, dtype=torch.long, device=x.device)
        check_labels(class_labels, "class_labels", x.shape[0], allow_null=True)
        angles = (s.log() / 4).to(w.dtype) * self.freqs
        e = self.noise_embed(torch.cat([angles.sin(), angles.cos()], 1)) + self.class_embed(class_labels.long())
        h = self.inp((c_in * x.to(torch.float64)).to(w.dtype))
        for norm, mlp in zip(self.norms, self.mlps):
            h = h + mlp(nn.functional.silu(norm(h) + e))
        f = self.out(h)
        return (c_skip * x.to(torch.float64) + c_out * f.to(torch.float64)).to(x.dtype)


def check_labels(labels: Tensor, name: str, batch: int | None, allow_null: bool) -> None:
    """``labels``: ``[batch]`` (any length where ``batch`` is None) integer classes ``0..9``, and the null
    label ``10`` where ``allow_null``."""
    top = NULL_CLASS if allow_null else N_CLASSES - 1
    valid = f"0..{N_CLASSES - 1}" + (f" or the null label {NULL_CLASS}" if allow_null else "")
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(f"{name} must be an integer tensor of classes {valid}, got {labels!r}")
    if labels.ndim != 1 or (batch is not None and len(labels) != batch):
        raise ValueError(f"{name} must have shape [{'B' if batch is None else batch}] (one class per sample), "
                         f"got {tuple(labels.shape)}")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) > top):
        bad = labels[(labels < 0) | (labels > top)].unique().tolist()
        hint = "" if allow_null else f" (for unconditional samples, the null label {NULL_CLASS}, pass labels=None)"
        raise ValueError(f"{name} must be classes {valid}{hint}, got {bad}")


class DigitsClassifier(nn.Module):
    """An MLP digits classifier; :meth:`features` (its penultimate layer) defines the Frechet distance."""

    def __init__(self, hidden: int = 256, features: int = 64):
        super().__init__()
        self.config = {"hidden": hidden, "features": features}
        self.body = nn.Sequential(nn.Linear(DIM, hidden), nn.SiLU(), nn.Linear(hidden, features), nn.SiLU())
        self.head = nn.Linear(features, N_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x.to(self.head.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
