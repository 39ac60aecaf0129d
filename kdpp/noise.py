r"""Noise streams: what a run's ``seed`` draws, and k-diffusion-style noise samplers.

One seed (an int, or one int per batch item) determines every random draw of a run, through
four streams that never share a generator:

| stream | what | drawn from |
|---|---|---|
| initial | the starting noise ``x_0 = sigma_0 * z`` | ``torch.Generator("cpu").manual_seed(seed)`` (:func:`initial_noise`) |
| solver | ancestral / consistency / churn noise of step ``j`` | a generator seeded ``stream_seed(stream_seed(seed, 1), j)`` on ``x.device`` |
| renoise | the teacher's renoising noise ``xi`` of step ``j`` | ``stream_seed(stream_seed(seed, 2), j)`` on ``x.device`` |
| levels | ``renoise_sigma="random"`` levels of step ``j`` | ``stream_seed(stream_seed(seed, 3), j)`` on the CPU (float64) |

``j`` is the *absolute* step: the index in the full schedule (``full_sigmas``), so a run split
into stages draws what the unsplit run draws. With one seed per item each item has its own
generators, so an image does not depend on the batch it was sampled in. The solver and renoise
draws are made in float32 and cast to ``x``'s dtype (torch's generators draw other values in other
dtypes), so a run in float16, bfloat16 or float64 gets the float32 run's noise up to rounding; the
initial noise is drawn in the dtype asked for, as ComfyUI and diffusers draw it. Because the refinement
draws only from its own streams, a run with ``lam > 0`` uses the same solver noise as the same
run with ``lam = 0``: comparisons are paired.

The *initial* stream is the host's when the host draws ``x`` (ComfyUI's ``prepare_noise`` and
diffusers with CPU generators draw exactly this). The *solver* stream is replaced by a host's
own noise sampler where the host has one (``noise_sampler=``: ComfyUI's, a diffusers
``generator``, A1111's seeded RNG), so that ``lam = 0`` stays the host's own sampler. Without a
seed the solver noise is ``torch.randn_like`` (k-diffusion's default) and the renoise and level
streams are seeded by :func:`derived_seed` of the global RNG state.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._checks import check_seed

NoiseSampler = Callable[[float, float], Tensor]

#: the stream numbers :func:`stream_seed` derives each stream's seed with
STREAMS = {"solver": 1, "renoise": 2, "levels": 3}


def seeded_noise_sampler(x: Tensor, seed: int | Sequence[int]) -> NoiseSampler:
    """Gaussian noise shaped like ``x`` from a private generator on ``x.device``, one draw per call
    (drawn in float32, returned in ``x``'s dtype).

    ``seed`` is one int for the whole batch, or one int per batch item (each item then gets
    its own generator). Seeds lie in torch's range ``-2**63 .. 2**64 - 1``.
    """
    seed = check_seed(seed, "seed", x.shape[0])
    single = isinstance(seed, int)
    gens = [torch.Generator(device=x.device).manual_seed(s) for s in ([seed] if single else seed)]
    shape = x.shape if single else x.shape[1:]

    def sample(sigma: float, sigma_next: float) -> Tensor:
        draws = [torch.randn(shape, generator=g, device=x.device, dtype=torch.float32) for g in gens]
        return (draws[0] if single else torch.stack(draws)).to(x.dtype)

    return sample


def initial_noise(seed: int | Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """The *initial* stream: unit Gaussian noise of ``shape`` on the CPU, from ``seed`` itself.

    One int: ``torch.randn(shape, generator=torch.Generator().manual_seed(seed))`` (ComfyUI's
    ``prepare_noise``); one int per item: item ``b`` is ``randn(shape[1:])`` from its own
    generator (diffusers with a list of CPU generators). Drawn in ``dtype``, as those hosts draw it
    (unlike the other streams, which draw in float32). Move it to the device afterwards, so images
    reproduce across devices.
    """
    seed = check_seed(seed, "seed", shape[0])
    if isinstance(seed, int):
        return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(s), dtype=dtype)
                        for s in seed])


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

    Used when no seed is given: two runs started from the same global seed draw the same
    renoise noise, and the solver's own noise is untouched.
    """
    if device.type == "cuda":
        state = torch.cuda.get_rng_state(device)
    else:
        state = torch.get_rng_state()
    digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class StepStreams:
    """One stream of a run, keyed by the absolute step: step ``j`` draws from its own generator(s).

    ``seed`` is the run's seed (an int or one per item), ``stream`` a :data:`STREAMS` name. Draws
    within one step continue that step's generator (DPM++ 2S draws twice per step); a step's
    generator does not depend on which steps were drawn before, so stages of a split run draw
    what the unsplit run draws.
    """

    def __init__(self, seed: int | list[int], stream: str, device: torch.device | str = "cpu"):
        seeds = [seed] if isinstance(seed, int) else list(seed)
        self.bases = [stream_seed(s, STREAMS[stream]) for s in seeds]
        self.single, self.device = isinstance(seed, int), torch.device(device)
        self.generators: dict[int, list[torch.Generator]] = {}

    def _generators(self, step: int) -> list[torch.Generator]:
        if step not in self.generators:
            self.generators[step] = [torch.Generator(device=self.device).manual_seed(stream_seed(b, step))
                                     for b in self.bases]
        return self.generators[step]

    def noise(self, step: int, like: Tensor) -> Tensor:
        """Unit Gaussian noise shaped like ``like`` (per item with per-item seeds) for absolute step ``step``."""
        gens = self._generators(step)
        shape = like.shape if self.single else like.shape[1:]
        draws = [torch.randn(shape, generator=g, device=self.device, dtype=torch.float32) for g in gens]
        return (draws[0] if self.single else torch.stack(draws)).to(like.dtype)

    def uniform(self, step: int) -> list[float]:
        """One uniform draw in ``[0, 1)`` per seed (float64, CPU) for absolute step ``step``."""
        return [torch.rand((), generator=g, dtype=torch.float64).item() for g in self._generators(step)]
