"""kdpp samplers in the one-model calling convention of k-diffusion hosts and ComfyUI.

Hosts call ``fn(model, x, sigmas, extra_args=..., callback=..., disable=..., **options)``
with ONE model; the teacher rides along as an option. :func:`host_sampler` adapts a kdpp
sampler to that convention, :func:`bind` fixes the teacher and the guidance options, and
:func:`register` puts named samplers into a namespace such as ``k_diffusion.sampling``.
"""
from __future__ import annotations

import inspect
import sys
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Iterable, Sequence

from torch import Tensor

from ._checks import check_kwargs
from .flow import sample_in_rf_frame
from .noise import NoiseSampler, seeded_noise_sampler, stream_seed
from .solvers import SAMPLERS

#: extra_args keys that belong to the host (ComfyUI's KSAMPLER), never forwarded to the teacher
HOST_ONLY_KEYS = frozenset({"seed", "model_options", "denoise_mask"})

#: the guidance options every host-convention sampler takes, with their defaults (and ``flow``, the host's frame)
GUIDANCE_DEFAULTS = {"teacher": None, "lam": 0.0, "k": None, "guided_steps": None, "flow": None}

_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
_HOST_PARAMETERS = [inspect.Parameter(name, _POSITIONAL) for name in ("model", "x", "sigmas")] + [
    inspect.Parameter(name, _POSITIONAL, default=None) for name in ("extra_args", "callback", "disable")]
_NOT_OPTIONS = {"student", "x", "sigmas", "extra_args", "callback", "disable", *GUIDANCE_DEFAULTS}


def comfyui_model_sampling(model) -> Any:
    """The ``model_sampling`` of a ComfyUI sampler model (``KSamplerX0Inpaint``), else ``None``; imports nothing."""
    return getattr(getattr(getattr(model, "inner_model", None), "inner_model", None), "model_sampling", None)


def is_flow_sampling(model_sampling) -> bool:
    """Whether a ComfyUI ``model_sampling`` object is CONST (rectified flow: x in the RF frame, sigma = t)."""
    return any(c.__name__ == "CONST" for c in type(model_sampling).__mro__)


def is_flow_model(model) -> bool:
    """Whether ``model`` is a ComfyUI model with CONST (rectified-flow) sampling: x in the RF frame, sigma = t."""
    return is_flow_sampling(comfyui_model_sampling(model))


def host_noise_sampler(model, x: Tensor, seed: int) -> NoiseSampler:
    """The solver noise a host would draw for ``seed``.

    Inside a running ComfyUI (its ``comfy.k_diffusion.sampling`` is imported and ``model`` is one of
    its models) this is ComfyUI's own ``default_noise_sampler(x, seed=seed)``, so every ComfyUI
    version's seeding is matched; elsewhere a generator on ``x.device`` seeded ``seed + 1`` on the
    CPU and ``seed`` on other devices, as ComfyUI from 0.8 seeds it.
    """
    comfy_sampling = sys.modules.get("comfy.k_diffusion.sampling")
    if comfy_sampling is not None and comfyui_model_sampling(model) is not None:
        return comfy_sampling.default_noise_sampler(x, seed=int(seed))
    return seeded_noise_sampler(x, int(seed) + (x.device.type == "cpu"))


def _host_signature(sampler: Callable) -> inspect.Signature:
    """k-diffusion's ``(model, x, sigmas, extra_args, callback, disable)``, then the sampler's own
    options (``eta``, ``s_noise``, ``noise_sampler``, ``renoise``, ...) and the guidance options,
    keyword-only: hosts such as A1111 / Forge pass ``eta``, ``s_churn``, ... only to samplers whose
    ``inspect.signature`` lists them."""
    options = [p.replace(kind=_KEYWORD) for p in inspect.signature(sampler).parameters.values()
               if p.name not in _NOT_OPTIONS]
    guidance = [inspect.Parameter(name, _KEYWORD, default=value) for name, value in GUIDANCE_DEFAULTS.items()]
    return inspect.Signature(_HOST_PARAMETERS + options + guidance)


def host_sampler(sampler: Callable) -> Callable:
    """``sampler`` in the host convention ``fn(model, x, sigmas, extra_args, callback, disable, *, <options>, teacher, lam, k, guided_steps, flow)``.

    - ``model`` is the student; ``teacher``, ``lam`` (default 0), ``k`` and ``guided_steps``
      are options; the sampler's own options (``eta``, ``s_noise``, ``noise_sampler``,
      ``renoise``, ...) are keyword parameters of the signature (``inspect.signature`` lists them).
    - ``extra_args["seed"]`` (ComfyUI passes it) seeds the solver noise as the host's default
      noise sampler does (:func:`host_noise_sampler`), unless a ``noise_sampler`` is given, and a
      renoise seed derived from it, unless ``renoise_seed`` is.
    - ``flow=True`` (default ``None``: detected for ComfyUI's CONST models) runs the sampler in the
      VE frame around a host whose ``x`` is rectified-flow framed and whose sigmas are ``t``
      (:func:`kdpp.flow.sample_in_rf_frame`); ``model`` and ``teacher`` are then RF x0 models.
    - The teacher gets ``teacher_extra_args`` if given, else ``extra_args`` without the host-only
      keys :data:`HOST_ONLY_KEYS`; the student gets ``extra_args`` whole, as hosts expect.
    """
    signature = _host_signature(sampler)

    def fn(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        options = dict(call.arguments)
        model, teacher, x, sigmas, lam, flow = (options.pop(name) for name in ("model", "teacher", "x", "sigmas", "lam",
                                                                               "flow"))
        if teacher is None and _nonzero(lam):
            raise TypeError(f"{sampler.__name__} got lam={lam!r} and no teacher: pass teacher=T when calling it, or "
                            "bind it (bind(sampler, T, lam, ...) / register(namespace, ..., teacher=T)); lam=0 needs none")
        extra_args = options["extra_args"] = check_kwargs(options["extra_args"], "extra_args")
        seed = extra_args.get("seed")
        if seed is not None:
            if options["renoise_seed"] is None and options["renoise_noise_sampler"] is None:
                options["renoise_seed"] = stream_seed(seed, 1)
            if "noise_sampler" in options and options["noise_sampler"] is None:
                options["noise_sampler"] = host_noise_sampler(model, x, seed)
        if options["teacher_extra_args"] is None:
            options["teacher_extra_args"] = {key: v for key, v in extra_args.items() if key not in HOST_ONLY_KEYS}
        if is_flow_model(model) if flow is None else flow:
            return sample_in_rf_frame(sampler, model, teacher, x, sigmas, lam, **options)
        return sampler(model, teacher, x, sigmas, lam, **options)

    fn.__name__ = fn.__qualname__ = sampler.__name__
    fn.__module__ = __name__
    fn.__signature__ = signature
    fn.__doc__ = f"Host-convention form of :func:`kdpp.{sampler.__name__}` (see :func:`kdpp.hosts.host_sampler`)."
    return fn


def _nonzero(lam) -> bool:
    """Whether a ``lam`` given as a number or a sequence of numbers has a nonzero entry (callables: left to the sampler)."""
    if isinstance(lam, (int, float)):
        return lam != 0
    if isinstance(lam, (list, tuple)):
        return any(_nonzero(v) for v in lam)
    return False


#: the samplers :func:`register` adds by default: the CFG++ forms need a student with ``guided_and_uncond``
#: (a host's plain one-model student, such as A1111's or ComfyUI's, has none), so they are added only by name
DEFAULT_NAMES = tuple(name for name in SAMPLERS if not name.endswith("_cfg_pp"))


def bind(sampler: Callable, teacher, lam, k: int | None = None, *, guided_steps: Sequence[int] | None = None,
         **options: Any) -> Callable:
    """``sampler`` in k-diffusion's convention ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``.

    The teacher, ``lam``, ``k`` / ``guided_steps`` and any of the sampler's options become
    the defaults of the returned function's keyword parameters (its ``inspect.signature``
    lists every option, as k-diffusion's samplers do); options given at call time override
    them, and a call-time ``k`` or ``guided_steps`` replaces the bound placement. ``teacher``
    may be ``None`` and given at call time. ``lam = 0`` gives a function equal to the plain sampler.
    """
    hosted = host_sampler(sampler)
    signature = hosted.__signature__
    bound = {"teacher": teacher, "lam": lam, "k": k, "guided_steps": guided_steps, **options}
    unknown = set(bound) - set(signature.parameters)
    if unknown:
        raise TypeError(f"{sampler.__name__} has no option {', '.join(map(repr, sorted(unknown)))}")
    signature = signature.replace(parameters=[p.replace(default=bound[p.name]) if p.name in bound else p
                                              for p in signature.parameters.values()])

    def fn(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        if "k" in call.arguments or "guided_steps" in call.arguments:  # a call-time placement replaces the bound one
            call.arguments.setdefault("k", None)
            call.arguments.setdefault("guided_steps", None)
        call.apply_defaults()
        return hosted(*call.args, **call.kwargs)

    fn.__name__ = fn.__qualname__ = sampler.__name__
    fn.__module__ = __name__
    fn.__signature__ = signature
    placement = f"guided_steps={guided_steps!r}" if guided_steps is not None else f"k={k!r}"
    fn.__doc__ = f"{sampler.__name__} bound to a teacher (lam={lam!r}, {placement}); k-diffusion's sampler signature."
    return fn


def register(namespace: ModuleType | SimpleNamespace | Any, names: Iterable[str] | None = None, *, teacher=None,
             lam=0.0, k: int | None = None, guided_steps: Sequence[int] | None = None, **options: Any) -> list[str]:
    """Add kdpp samplers to ``namespace`` as ``sample_<name>_distpp`` and return the attribute names.

    ``names`` defaults to :data:`DEFAULT_NAMES`: every ``kdpp.SAMPLERS`` entry but the CFG++ forms,
    which need a student with ``guided_and_uncond`` (name them to add them). Each is
    :func:`bind`-ed to ``teacher``, ``lam``, ``k`` / ``guided_steps`` and ``options``,
    which are its defaults: without ``teacher`` the samplers take it at call time
    (``fn(model, x, sigmas, ..., teacher=T)``) and keep the registered ``lam``, ``k`` and
    options. ``options`` must be taken by every named sampler (``eta``: register the ancestral
    ones in a call of their own). A host that looks samplers up as
    ``getattr(k_diffusion.sampling, "sample_" + name)`` then finds ``name = "euler_distpp"`` and the others.
    """
    bound = {}
    for name in (DEFAULT_NAMES if names is None else names):
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; known: {sorted(SAMPLERS)}")
        bound[f"sample_{name}_distpp"] = bind(SAMPLERS[name], teacher, lam, k, guided_steps=guided_steps, **options)
    for attr, fn in bound.items():  # all or nothing
        setattr(namespace, attr, fn)
    return list(bound)
