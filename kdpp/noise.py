"""Noise samplers in k-diffusion's convention: ``noise_sampler(sigma, sigma_next) -> Tensor``.

kdpp keeps two noise streams apart: the *solver* noise (ancestral / consistency
renoising, ``noise_sampler=``, k-diffusion's default of ``torch.randn_like``)
and the *renoise* noise ``xi`` the teacher refinement draws. Because the
refinement never touches the solver's stream, a run with ``lam > 0`` uses the
same solver noise as the same run with ``lam = 0``: comparisons are paired.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._checks import check_seed

NoiseSampler = Callable[[float, float], Tensor]


def default_noise_sampler(x: Tensor) -> NoiseSampler:
    """k-diffusion's default: fresh ``torch.randn_like(x)`` from the global RNG."""
    return lambda sigma, sigma_next: torch.randn_like(x)


def seeded_noise_sampler(x: Tensor, seed: int | Sequence[int]) -> NoiseSampler:
    """Gaussian noise shaped like ``x`` from a private generator on ``x.device``.

    ``seed`` is one int for the whole batch, or one int per batch item (each item
    then gets its own generator, so an image's noise does not depend on the
    batch it was sampled in). Seeds lie in torch's range ``-2**63 .. 2**64 - 1``. The
    renoise stream draws the same way: give it a different seed (``renoise_seed``; e.g.
    :func:`stream_seed` ``(seed, 1)`` and ``(seed, 2)``), or the two streams are identical.
    """
    seed = check_seed(seed, "seed", x.shape[0])
    single = isinstance(seed, int)
    gens = [torch.Generator(device=x.device).manual_seed(s) for s in ([seed] if single else seed)]
    shape = x.shape if single else x.shape[1:]

    def sample(sigma: float, sigma_next: float) -> Tensor:
        draws = [torch.randn(shape, generator=g, device=x.device, dtype=x.dtype) for g in gens]
        return draws[0] if single else torch.stack(draws)

    return sample


def stream_seed(seed: int, stream: int) -> int:
    """A seed for noise stream ``stream`` of a run seeded ``seed`` (splitmix64 of both).

    Streams of one seed, and the same stream of neighbouring seeds, are unrelated, so a
    batch seeded 0, 1, 2, ... does not reuse one image's noise in another.
    """
    z = (int(seed) * 0x9E3779B97F4A7C15 + int(stream) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) % 2**63


def derived_seed(device: torch.device) -> int:
    """A seed derived from (without advancing) the default RNG state of ``device``.

    Used when no renoise seed is given: two runs started from the same global
    seed draw the same renoise noise, and the solver's own noise is untouched.
    """
    if device.type == "cuda":
        state = torch.cuda.get_rng_state(device)
    else:
        state = torch.get_rng_state()
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)
