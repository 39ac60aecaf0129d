"""Moved to :mod:`kdpp.diffusers.vp`; this module keeps the old import path working."""
from .diffusers.vp import PREDICTIONS, VPDenoiser, guidance_scale_embedding

__all__ = ["PREDICTIONS", "VPDenoiser", "guidance_scale_embedding"]
