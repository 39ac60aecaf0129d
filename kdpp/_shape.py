"""Tiny shape and dtype helpers shared by the samplers and the model wrappers."""
from __future__ import annotations

import torch
from torch import Tensor


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A ``[batch]`` tensor reshaped to broadcast against ``x`` (``[batch, 1, ..., 1]``) in ``x``'s dtype."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


def sigma_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sigmas handed to models for samples of ``dtype``: float32 or better.

    ``torch.promote_types(dtype, torch.float32)``: float32 for fp16, bf16 and fp32 samples,
    float64 for fp64 ones. A half-precision sigma would move timesteps (bf16 rounds 230 of
    the 1000 SD training sigmas onto a neighbouring timestep's).
    """
    return torch.promote_types(dtype, torch.float32)


def sigma_batch(sigma: float, x: Tensor) -> Tensor:
    """The ``[batch]`` sigma tensor a model is called with at level ``sigma`` for the sample ``x``."""
    return torch.full((x.shape[0],), sigma, dtype=sigma_dtype(x.dtype), device=x.device)


def model_sigma(sigma: Tensor, x: Tensor) -> Tensor:
    """A ``sigma`` tensor for a model call on ``x`` in float32 or better (a wider dtype is kept)."""
    return sigma.to(torch.promote_types(sigma.dtype, sigma_dtype(x.dtype)))
