"""kdpp samplers in the one-model calling convention of k-diffusion hosts and ComfyUI.

Hosts call ``fn(model, x, sigmas, extra_args=..., callback=..., disable=..., **options)``
with ONE model; the teacher rides along as an option. :func:`host_sampler` adapts a kdpp
sampler to that convention, :func:`bind` fixes the teacher and the guidance options, and
:func:`register` puts named samplers into a namespace such as ``k_diffusion.sampling``.
"""
from __future__ import annotations

import functools
import inspect
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Iterable

from torch import Tensor

from .noise import seeded_noise_sampler, stream_seed
from .solvers import SAMPLERS

#: extra_args keys that belong to the host (ComfyUI's KSAMPLER), never forwarded to the teacher
HOST_ONLY_KEYS = frozenset({"seed", "model_options", "denoise_mask"})


def host_sampler(sampler: Callable) -> Callable:
    """``sampler`` with the host signature ``fn(model, x, sigmas, extra_args, callback, disable, *, teacher, lam, k, **options)``.

    - ``model`` is the student; ``teacher``, ``lam`` (default 0) and ``k`` (default 1) are options.
    - ``extra_args["seed"]`` (ComfyUI passes it) seeds the solver noise as ComfyUI's default
      noise sampler does (a generator on ``x.device``; ``seed + 1`` on the CPU), unless a
      ``noise_sampler`` is given, and a renoise seed derived from it, unless ``renoise_seed`` is.
    - The teacher gets ``teacher_extra_args`` if given, else ``extra_args`` without the host-only
      keys :data:`HOST_ONLY_KEYS`; the student gets ``extra_args`` whole, as hosts expect.
    """
    takes_noise = "noise_sampler" in inspect.signature(sampler).parameters

    @functools.wraps(sampler)
    def fn(model, x: Tensor, sigmas, extra_args=None, callback=None, disable=None, *, teacher=None, lam=0.0, k=1,
           **options):
        extra_args = {} if extra_args is None else extra_args
        seed = extra_args.get("seed")
        if seed is not None:
            options.setdefault("renoise_seed", stream_seed(seed, 1))
            if takes_noise and options.get("noise_sampler") is None:
                # as ComfyUI's default noise sampler: seed + 1 on the CPU, where the initial noise used the seed
                options["noise_sampler"] = seeded_noise_sampler(x, int(seed) + (x.device.type == "cpu"))
        if options.get("teacher_extra_args") is None:
            options["teacher_extra_args"] = {key: v for key, v in extra_args.items() if key not in HOST_ONLY_KEYS}
        return sampler(model, teacher, x, sigmas, lam, k, extra_args=extra_args, callback=callback, disable=disable,
                       **options)

    fn.__doc__ = f"Host-convention form of :func:`kdpp.{sampler.__name__}` (see :func:`kdpp.hosts.host_sampler`)."
    del fn.__wrapped__  # the signature is the host's, not the kdpp sampler's
    return fn


def bind(sampler: Callable, teacher, lam, k: int = 1, **options: Any) -> Callable:
    """A sampler with exactly k-diffusion's signature ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **kw)``.

    The teacher, ``lam``, ``k`` and any kdpp options are fixed; options given at call
    time override them. ``lam = 0`` gives a function equal to the plain sampler.
    """
    hosted = host_sampler(sampler)

    def fn(model, x: Tensor, sigmas, extra_args=None, callback=None, disable=None, **kw):
        return hosted(model, x, sigmas, extra_args, callback, disable, **{"teacher": teacher, "lam": lam, "k": k, **options, **kw})

    fn.__name__ = fn.__qualname__ = sampler.__name__
    fn.__doc__ = f"{sampler.__name__} bound to a teacher (lam={lam!r}, k={k}); k-diffusion's sampler signature."
    return fn


def register(namespace: ModuleType | SimpleNamespace | Any, names: Iterable[str] | None = None, *, teacher=None,
             lam=0.0, k: int = 1, **options: Any) -> list[str]:
    """Add kdpp samplers to ``namespace`` as ``sample_<name>_distpp`` and return the attribute names.

    With ``teacher`` given the samplers are :func:`bind`-ed to it; without, they take the
    teacher at call time (``fn(model, x, sigmas, ..., teacher=T, lam=0.5)``). A host that
    looks samplers up as ``getattr(k_diffusion.sampling, "sample_" + name)`` then finds
    ``name = "euler_distpp"`` and the others (``kdpp.SAMPLERS`` lists them).
    """
    added = []
    for name in (SAMPLERS if names is None else names):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
        sampler = SAMPLERS[name]
        fn = bind(sampler, teacher, lam, k, **options) if teacher is not None else host_sampler(sampler)
        attr = f"sample_{name}_distpp"
        setattr(namespace, attr, fn)
        added.append(attr)
    return added
