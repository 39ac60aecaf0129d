"""Rectified-flow (flow-matching) models as VE denoisers, and back.

Rectified flow writes ``x_rf = (1 - t) x0 + t eps`` with ``t in [0, 1)``; dividing by
``1 - t`` gives the VE form ``x_ve = x0 + sigma eps`` with

    sigma = t / (1 - t),     x_ve = x_rf / (1 - t)      (t = sigma / (1 + sigma))

A velocity model predicts ``v = eps - x0 = (x_rf - x0) / t``, an x0-model ``x0``
itself. :class:`FlowDenoiser` wraps either as a VE denoiser, so every kdpp sampler runs
flow students and teachers (mixed with VE ones if they share the data space);
:class:`VelocityModel` goes the other way. ``t = 1`` (pure noise) is ``sigma = inf``:
start VE samplers from a ``t_max < 1`` (e.g. 0.999 gives sigma = 999).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ._shape import per_sample


def sigma_from_t(t: Tensor | float) -> Tensor:
    """``sigma = t / (1 - t)``."""
    t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
    return t / (1 - t)


def t_from_sigma(sigma: Tensor | float) -> Tensor:
    """``t = sigma / (1 + sigma)``."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
    return sigma / (1 + sigma)


def rf_to_ve(x_rf: Tensor, t: Tensor | float) -> Tensor:
    """``x_ve = x_rf / (1 - t)`` (``t`` a float or one value per batch item)."""
    t = torch.as_tensor(t, dtype=x_rf.dtype, device=x_rf.device).expand(x_rf.shape[0])
    return x_rf / (1 - per_sample(t, x_rf))


def ve_to_rf(x_ve: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_rf = x_ve / (1 + sigma)``."""
    sigma = torch.as_tensor(sigma, dtype=x_ve.dtype, device=x_ve.device).expand(x_ve.shape[0])
    return x_ve / (1 + per_sample(sigma, x_ve))


class FlowDenoiser:
    r"""A rectified-flow model ``f(x_rf, t, **extra)`` as a VE denoiser ``D(x_ve, sigma)``.

    ``prediction="velocity"``: ``D = x_rf - t * v(x_rf, t)``; ``"x0"``: ``D = f(x_rf, t)``.
    ``t`` reaches the model as a ``[batch]`` tensor in the dtype of ``x``.
    """

    def __init__(self, model: Callable[..., Tensor], prediction: str = "velocity"):
        if prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")
        self.model, self.prediction = model, prediction

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        t = sigma / (1 + sigma)
        x_rf = x / (1 + per_sample(sigma, x))
        out = self.model(x_rf, t, **extra)
        return x_rf - per_sample(t, x) * out if self.prediction == "velocity" else out


class VelocityModel:
    r"""A VE denoiser ``D(x_ve, sigma)`` as a rectified-flow velocity model ``v(x_rf, t) = (x_rf - x0) / t``."""

    def __init__(self, denoiser: Callable[..., Tensor]):
        self.denoiser = denoiser

    def __call__(self, x_rf: Tensor, t: Tensor, **extra) -> Tensor:
        sigma = t / (1 - t)
        x0 = self.denoiser(x_rf / (1 - per_sample(t, x_rf)), sigma, **extra)
        return (x_rf - x0) / per_sample(t, x_rf)
