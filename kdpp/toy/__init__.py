"""kdpp.toy: an analytic testbed for diffusion samplers.

Gaussian mixtures have exact denoisers, scores, densities and flow maps, so a
sampler's output can be compared with the truth: see ``docs/toy.md``.
"""
from .distributions import DISTRIBUTIONS, gaussian, grid, high_dim, ring
from .metrics import (Estimate, bootstrap, mmd_rbf, mode_coverage, mode_masses, nll, paired_difference,
                      sliced_wasserstein, wasserstein2)
from .mixture import GaussianMixture
from .students import FlowMapStudent, shifted_student, truncated_flow_map_student

__all__ = [
    "DISTRIBUTIONS", "Estimate", "FlowMapStudent", "GaussianMixture", "bootstrap", "gaussian", "grid",
    "high_dim", "mmd_rbf", "mode_coverage", "mode_masses", "nll", "paired_difference", "ring", "shifted_student",
    "sliced_wasserstein", "truncated_flow_map_student", "wasserstein2",
]
