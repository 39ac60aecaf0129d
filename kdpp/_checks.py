"""Input validation shared by every sampler: one place for every error message."""
from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor


def check_x(x: Tensor) -> None:
    """`x` must be a finite floating-point tensor with a batch dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")


def check_sigmas(sigmas: Tensor | Sequence[float]) -> list[float]:
    """Validate a noise schedule and return it as Python floats.

    The schedule must be 1-D, finite, strictly decreasing, with every entry but
    the last positive. The last entry may be 0 (a full sampling run) or positive
    (the run stops at that noise level, as k-diffusion allows: hosts split one
    schedule into stages that way).
    """
    s = sigmas.detach() if isinstance(sigmas, Tensor) else torch.as_tensor(sigmas, dtype=torch.float64)
    if s.ndim != 1:
        raise ValueError(f"sigmas must be 1-D, got shape {tuple(s.shape)}")
    if s.numel() == 0:
        raise ValueError("sigmas must not be empty")
    if not s.is_floating_point():
        s = s.double()
    values = s.cpu().double().tolist()
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError(f"sigmas must be finite, got {values}")
    if values[-1] < 0 or any(v <= 0 for v in values[:-1]):
        raise ValueError(f"sigmas must be positive except the last, which may be 0; got {values}")
    if any(a <= b for a, b in zip(values, values[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {values}")
    return values


def check_k(k: int) -> int:
    """`k`, the number of guided steps, is a non-negative integer."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a non-negative int, got {k!r}")
    if k < 0:
        raise ValueError(f"k must be a non-negative int, got {k}")
    return int(k)


def check_finite_number(value, name: str) -> float:
    """A real, finite number (Python, NumPy or 0-d tensor)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if value != value or abs(value) == float("inf"):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


class OutputChecker:
    """Checks every model output: shape and dtype at once, finiteness at the end.

    Finiteness is recorded as the output's sum (NaN and inf propagate into it;
    half types are summed in float32) written into one preallocated device
    buffer, read once when the run finishes: the loop never waits on the device,
    pays one reduction per call, and keeps no per-call allocation alive (many
    small live tensors between large freed ones fragment the CPU heap, which
    made peak memory grow with the number of steps).
    """

    def __init__(self, x: Tensor, capacity: int = 64):
        self.shape, self.dtype = x.shape, x.dtype
        self.sums = torch.empty(capacity, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                                device=x.device)
        self.count = 0
        self.where: list[str] = []

    def __call__(self, out, who: str, i: int, sigma: float) -> Tensor:
        where = f"{who} at step {i} (sigma={sigma:.6g})"
        if not isinstance(out, Tensor):
            raise TypeError(f"{where} returned {type(out).__name__}, expected a torch.Tensor")
        if out.shape != self.shape:
            raise ValueError(f"{where} returned shape {tuple(out.shape)}, expected {tuple(self.shape)} (the shape of x)")
        if out.dtype != self.dtype:
            raise TypeError(f"{where} returned dtype {out.dtype}, expected {self.dtype} (the dtype of x)")
        if self.count == len(self.sums):
            self.sums = torch.cat([self.sums, torch.empty_like(self.sums)])
        self.sums[self.count] = out.sum(dtype=self.sums.dtype)
        self.count += 1
        self.where.append(where)
        return out

    def raise_if_nonfinite(self) -> None:
        ok = self.sums[: self.count].isfinite().cpu()
        if not bool(ok.all()):
            first = int((~ok).nonzero()[0])
            raise FloatingPointError(f"{self.where[first]} returned NaN or inf")
