"""kdpp.toy: an analytic testbed (Gaussian mixtures with exact denoisers and flow maps)."""
from .mixture import GaussianMixture

__all__ = ["GaussianMixture"]
