"""Toy students: endpoint predictors (like consistency / LCM / DMD2 students) with a known error."""
from __future__ import annotations

import torch
from torch import Tensor

from .mixture import GaussianMixture


class FlowMapStudent:
    r"""An endpoint predictor ``S(x, sigma) ≈ flow_map(x, sigma -> 0)`` of a mixture.

    ``steps=None``: the exact flow map of ``mixture`` (RK4 with ``steps_per_unit``
    steps per unit of log sigma: error ~1e-6, far below any student's; a perfectly
    distilled consistency model of that mixture). ``steps=n``: the flow map truncated to
    ``n`` Euler (DDIM) steps on the geometric schedule from ``sigma`` to
    ``sigma_min`` and then to 0, with the exact denoiser: an imperfectly
    distilled student whose error shrinks as ``n`` grows (``n = 1`` is the
    posterior mean ``D(x, sigma)``, the blurriest endpoint).

    Usable as a denoiser with every kdpp sampler: ``student(x, sigma_batch)``.
    """

    def __init__(self, mixture: GaussianMixture, steps: int | None = None, sigma_min: float = 0.05,
                 steps_per_unit: int = 12):
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be a positive int or None, got {steps!r}")
        self.mixture, self.steps, self.sigma_min, self.steps_per_unit = mixture, steps, sigma_min, steps_per_unit

    def _endpoint(self, x: Tensor, sigma: float) -> Tensor:
        if self.steps is None:
            return self.mixture.flow_map(x, sigma, 0.0, self.steps_per_unit)
        n, lo = self.steps, min(self.sigma_min, sigma / 2)
        levels = [sigma * (lo / sigma) ** (j / (n - 1)) for j in range(n)] if n > 1 else [sigma]
        levels.append(0.0)
        for s, s_next in zip(levels[:-1], levels[1:]):
            d = self.mixture.denoiser(x, s)
            x = d + (s_next / s) * (x - d)
        return x

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        values = torch.as_tensor(sigma).reshape(-1).tolist()
        if len(set(values)) == 1:
            return self._endpoint(x, values[0])
        return torch.cat([self._endpoint(x[j: j + 1], s) for j, s in enumerate(values)])

    def __repr__(self) -> str:
        return f"FlowMapStudent({self.mixture!r}, steps={self.steps})"


def truncated_flow_map_student(mixture: GaussianMixture, steps: int = 2) -> FlowMapStudent:
    """Imperfect distillation: the teacher's own flow map computed with ``steps`` coarse steps."""
    return FlowMapStudent(mixture, steps)


def shifted_student(mixture: GaussianMixture, mean_shift=0.0, std_scale: float = 1.0, weights=None) -> FlowMapStudent:
    """Distribution shift: the exact flow map of a perturbed mixture (the paper's OOD argument)."""
    return FlowMapStudent(mixture.shifted(mean_shift, std_scale, weights))
