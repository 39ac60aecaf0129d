"""Moved to :mod:`kdpp.diffusers.sdxl`; this module keeps the old import path working."""
from .diffusers.sdxl import SDXLConditioning, check_shared_latent_space, generate, time_ids

__all__ = ["SDXLConditioning", "check_shared_latent_space", "generate", "time_ids"]
