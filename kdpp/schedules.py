"""Noise schedules (VE sigmas, decreasing, ending in 0), and where a sigma or a stage lies in one."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._checks import _index


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022): ``n`` sigmas evenly spaced in ``sigma^(1/rho)``, then 0 (float64)."""
    if _index(n) is None or n < 1:
        raise ValueError(f"n (the number of steps) must be an int >= 1, got {n!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"karras_sigmas needs 0 < sigma_min < sigma_max, got sigma_min={sigma_min!r}, "
                         f"sigma_max={sigma_max!r} (k-diffusion's get_sigmas_karras takes them in this order too)")
    if not rho > 0:
        raise ValueError(f"rho must be positive, got {rho!r}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1, dtype=torch.float64)])


def scaled_linear_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> Tensor:
    """``alphas_cumprod`` of the SD / SDXL "scaled_linear" beta schedule (float64)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """VE sigma of every VP timestep: ``sigma_t = sqrt((1 - alphabar_t) / alphabar_t)``."""
    a = alphas_cumprod.double()
    return ((1 - a) / a).sqrt()


def trailing_timesteps(n: int, num_train_timesteps: int = 1000) -> list[int]:
    """The "trailing" spacing of distilled students: ``T-1, T-1-T/n, ...`` (4 steps: 999, 749, 499, 249)."""
    return [round(num_train_timesteps - j * num_train_timesteps / n) - 1 for j in range(n)]


def timestep_sigmas(timesteps: list[int], alphas_cumprod: Tensor | None = None) -> Tensor:
    """The sigmas of the given VP timesteps, then 0 (default: the SD / SDXL schedule)."""
    sigmas = vp_sigmas(scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    steps = [_index(t) for t in timesteps]
    if any(t is None or not 0 <= t < len(sigmas) for t in steps):
        raise ValueError(f"timesteps must be ints in 0 .. {len(sigmas) - 1} (the schedule's training timesteps), "
                         f"got {list(timesteps)}")
    return torch.cat([sigmas[steps], torch.zeros(1, dtype=torch.float64)])


def match_tolerance(dtype: torch.dtype | None) -> float:
    """The relative tolerance within which a sigma that passed through ``dtype`` is taken to be a schedule entry.

    One rounding of ``dtype`` (``finfo(dtype).eps``: 1e-3 for float16, 8e-3 for bfloat16), and never
    below 1e-6, so float32 copies of a float64 schedule match it.
    """
    eps = torch.finfo(dtype).eps if dtype is not None and dtype.is_floating_point else 0.0
    return max(eps, 1e-6)


def step_index(sigma: float, sigmas: Sequence[float], tolerance: float = 1e-6) -> tuple[int, float]:
    """Which step of ``sigmas`` a model call at ``sigma`` belongs to, and ``sigma`` snapped to the schedule.

    Step ``i`` covers ``sigmas[i] >= sigma > sigmas[i + 1]``; a ``sigma`` within ``tolerance``
    (relative) of an entry is that entry (a call at ``sigmas[i + 1]``, a Heun corrector, starts
    step ``i + 1``). Levels above ``sigmas[0]`` (a churned first step) belong to step 0, levels at
    or below the last entry to the last step. The one place kdpp decides "which step is this".
    """
    n = len(sigmas) - 1
    for j, entry in enumerate(sigmas):
        if abs(entry - sigma) <= tolerance * entry:
            return min(j, n - 1), float(entry)
    below = sum(1 for entry in sigmas if entry > sigma)  # entries above sigma: the step's start is the last of them
    return min(max(below - 1, 0), n - 1), float(sigma)


def stage_offset(sigmas: Sequence[float], full_sigmas: Sequence[float], tolerance: float = 1e-6) -> int:
    """Where a stage ``sigmas`` of a split run starts in the run's ``full_sigmas`` (its first step's index).

    The stage must be a contiguous slice of the full schedule, except that its last entry may
    be 0 where the full schedule goes on (ComfyUI's KSamplerAdvanced ends a stage that way);
    anything else is a ``ValueError`` naming ``full_sigmas``.
    """
    first = sigmas[0]
    starts = [j for j, entry in enumerate(full_sigmas[:-1]) if abs(entry - first) <= tolerance * entry]
    if not starts:
        raise ValueError(f"sigmas[0] = {first:.6g} is not a level of full_sigmas (the schedule this stage was cut "
                         f"from): got full_sigmas {_short(full_sigmas)}")
    offset = starts[0]
    n = len(sigmas) - 1
    expected = full_sigmas[offset:offset + n + 1]
    inner_ok = len(expected) == n + 1 and all(abs(a - b) <= tolerance * b for a, b in zip(sigmas[:-1], expected[:-1]))
    last_ok = inner_ok and (sigmas[-1] == 0 or abs(sigmas[-1] - expected[-1]) <= tolerance * expected[-1])
    if not last_ok:
        raise ValueError(f"sigmas {_short(sigmas)} is not a slice of full_sigmas {_short(full_sigmas)} starting at "
                         f"step {offset} (a stage may only end in 0 early): pass the schedule it was cut from")
    return offset


def _short(values: Sequence[float]) -> str:
    shown = ", ".join(f"{v:.4g}" for v in values[:8])
    return f"[{shown}{', ...' if len(values) > 8 else ''}] ({len(values)} entries)"
