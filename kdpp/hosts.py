"""kdpp samplers in the one-model calling convention of k-diffusion hosts (A1111, Forge, ComfyUI, ...).

Hosts call ``fn(model, x, sigmas, extra_args=..., callback=..., disable=..., **options)`` with
ONE model; the teacher rides along as an option. :func:`host_sampler` adapts a kdpp sampler to
that convention (the one hosted-run path: ComfyUI's nodes run through it too), :func:`bind`
fixes the teacher and the guidance options, and :func:`register` puts named samplers into a
namespace such as ``k_diffusion.sampling``.

What differs between hosts is described by a :class:`Host`: whether a model is the host's,
whether its ``x`` is rectified-flow framed, the host's own solver noise, how a CFG++ student is
read from the host's model, and which ``extra_args`` keys belong to the host. The default,
:data:`KDIFFUSION`, is k-diffusion's convention (A1111 / Forge); a host package registers its
own with :func:`register_host` (``import kdpp.comfyui`` registers ComfyUI's). A host hands the
core a seed, the full schedule and an offset, nothing more: the seeding and stepping policy is
the core's (:mod:`kdpp.noise`, :class:`kdpp.TeacherRefinement`).
"""
from __future__ import annotations

import inspect
import sys
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import Tensor

from ._checks import check_kwargs
from .flow import sample_in_rf_frame
from .noise import NoiseSampler
from .solvers import SAMPLERS


class Host:
    """A host's conventions around the one-model call; subclass and :func:`register_host` for a new host.

    The defaults are k-diffusion's (A1111 / Forge): any model, VE frame, ``extra_args`` all the
    student's, and solver noise from ``k_diffusion.sampling.torch.randn_like`` when k-diffusion
    is loaded: A1111 and Forge replace that module attribute with their per-image seeded RNG, so
    a kdpp sampler draws the host's seeded noise as k-diffusion's own samplers do.
    """

    name = "k-diffusion"
    #: ``extra_args`` keys that belong to the host, never forwarded to the teacher
    host_only_keys: frozenset[str] = frozenset()

    def owns(self, model: Any) -> bool:
        """Whether ``model`` is one of this host's sampler models."""
        return True

    def is_flow(self, model: Any) -> bool:
        """Whether the host keeps ``x`` in the rectified-flow frame for ``model`` (its sigmas are then ``t``)."""
        return False

    def seed(self, extra_args: Mapping[str, Any]) -> int | None:
        """The seed the host passes with a call (``None``: none)."""
        return None

    def noise_sampler(self, model: Any, x: Tensor, seed: int | None) -> NoiseSampler | None:
        """The host's own solver noise for a run seeded ``seed`` (``None``: the core's, see :mod:`kdpp.noise`)."""
        if seed is not None:
            return None
        kd = sys.modules.get("k_diffusion.sampling")
        torch_like = getattr(kd, "torch", None)
        if torch_like is None:
            return None
        return lambda sigma, sigma_next: torch_like.randn_like(x)

    def student(self, model: Any, extra_args: Mapping[str, Any], cfg_pp: bool) -> Any:
        """The student denoiser for ``model`` (a CFG++ sampler needs ``guided_and_uncond`` on it)."""
        return model


#: k-diffusion's convention (A1111, Forge): the host used when no registered one owns the model
KDIFFUSION = Host()
_HOSTS: list[Host] = []


def register_host(host: Host) -> None:
    """Make ``host`` known: :func:`host_of` asks registered hosts (latest first) before :data:`KDIFFUSION`."""
    if not isinstance(host, Host):
        raise TypeError(f"host must be a kdpp.hosts.Host, got {type(host).__name__}")
    _HOSTS[:] = [h for h in _HOSTS if h.name != host.name] + [host]


def host_of(model: Any) -> Host:
    """The registered :class:`Host` that owns ``model``, else :data:`KDIFFUSION`."""
    return next((h for h in reversed(_HOSTS) if h.owns(model)), KDIFFUSION)


#: the guidance options every host-convention sampler takes, with their defaults (and ``flow``, the host's frame)
GUIDANCE_DEFAULTS = {"teacher": None, "lam": 0.0, "k": None, "guided_steps": None, "flow": None}

_KEYWORD = inspect.Parameter.KEYWORD_ONLY
_POSITIONAL = inspect.Parameter.POSITIONAL_OR_KEYWORD
_HOST_PARAMETERS = [inspect.Parameter(name, _POSITIONAL) for name in ("model", "x", "sigmas")] + [
    inspect.Parameter(name, _POSITIONAL, default=None) for name in ("extra_args", "callback", "disable")]
_NOT_OPTIONS = {"student", "x", "sigmas", "extra_args", "callback", "disable", *GUIDANCE_DEFAULTS}
#: the leading parameters of every kdpp sampler, which :func:`host_sampler` and :func:`bind` rely on
SAMPLER_PARAMETERS = ("student", "teacher", "x", "sigmas", "lam", "k")


def _check_sampler(sampler: Any, caller: str) -> inspect.Signature:
    """``sampler``'s signature, refused unless it is a kdpp sampler's ``(student, teacher, x, sigmas, lam, k, *, ...)``."""
    try:
        signature = inspect.signature(sampler)
    except (TypeError, ValueError):
        signature = None
    params = list(signature.parameters) if signature is not None else []
    if tuple(params[:len(SAMPLER_PARAMETERS)]) != SAMPLER_PARAMETERS or not {"extra_args", "callback", "disable"} <= set(params):
        name = getattr(sampler, "__name__", type(sampler).__name__)
        raise TypeError(f"{caller} takes a kdpp sampler (a value of kdpp.SAMPLERS, signature (student, teacher, x, sigmas, "
                        f"lam, k, *, extra_args, callback, disable, ...)), got {name} with signature {signature}; "
                        "for any other k-diffusion sampler wrap the student in kdpp.wrappers.DistillationDenoiser")
    return signature


def _host_signature(sampler: Callable) -> inspect.Signature:
    """k-diffusion's ``(model, x, sigmas, extra_args, callback, disable)``, then the sampler's own
    options (``eta``, ``s_noise``, ``noise_sampler``, ``renoise``, ``seed``, ...) and the guidance
    options, keyword-only, so ``inspect.signature`` lists every option."""
    options = [p.replace(kind=_KEYWORD) for p in _check_sampler(sampler, "host_sampler").parameters.values()
               if p.name not in _NOT_OPTIONS]
    guidance = [inspect.Parameter(name, _KEYWORD, default=value) for name, value in GUIDANCE_DEFAULTS.items()]
    return inspect.Signature(_HOST_PARAMETERS + options + guidance)


def host_sampler(sampler: Callable) -> Callable:
    """``sampler`` in the host convention ``fn(model, x, sigmas, extra_args, callback, disable, *, <options>, teacher, lam, k, guided_steps, flow)``.

    - ``model`` is the student; ``teacher``, ``lam`` (default 0), ``k`` and ``guided_steps``
      are options; the sampler's own options (``eta``, ``s_noise``, ``noise_sampler``,
      ``renoise``, ``seed``, ``full_sigmas``, ``step_offset``, ...) are keyword parameters of the
      signature.
    - The host (:func:`host_of` the model) may pass a seed with the call (ComfyUI's
      ``extra_args["seed"]``); it is the run's ``seed`` unless one is given. Solver noise is the
      host's own (:meth:`Host.noise_sampler`: ComfyUI's seeded sampler, A1111's seeded RNG)
      unless a ``noise_sampler`` is given, so ``lam = 0`` is the host's built-in sampler; the
      renoise noise and random levels come from the seed (:mod:`kdpp.noise`).
    - ``flow=True`` (default ``None``: the host decides, ComfyUI's CONST models are flow) runs the
      sampler in the VE frame around a host whose ``x`` is rectified-flow framed and whose sigmas
      (and ``full_sigmas``) are ``t`` (:func:`kdpp.flow.sample_in_rf_frame`).
    - The teacher gets ``teacher_extra_args`` if given, else ``extra_args`` without the host's own
      keys (:attr:`Host.host_only_keys`); the student gets ``extra_args`` whole, as hosts expect.
    - Errors raised while validating or running the call name the sampler.
    """
    signature = _host_signature(sampler)
    cfg_pp = bool(getattr(sampler, "cfg_pp", False))

    def fn(*args, **kwargs):
        try:
            call = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{sampler.__name__}: {e} (signature {signature})") from None
        call.apply_defaults()
        options = dict(call.arguments)
        model, teacher, x, sigmas, lam, flow = (options.pop(name) for name in ("model", "teacher", "x", "sigmas", "lam",
                                                                               "flow"))
        if teacher is None and _nonzero(lam):
            raise TypeError(f"{sampler.__name__} got lam={lam!r} and no teacher: pass teacher=T when calling it, or "
                            "bind it (bind(sampler, T, lam, ...) / register(namespace, ..., teacher=T)); lam=0 needs none")
        host = host_of(model)
        extra_args = options["extra_args"] = dict(check_kwargs(options["extra_args"], "extra_args"))
        if options["seed"] is None:
            options["seed"] = host.seed(extra_args)
        if "noise_sampler" in options and options["noise_sampler"] is None:
            options["noise_sampler"] = host.noise_sampler(model, x, options["seed"])
        if options["teacher_extra_args"] is None and set(extra_args) & host.host_only_keys:
            options["teacher_extra_args"] = {key: v for key, v in extra_args.items() if key not in host.host_only_keys}
        student = host.student(model, extra_args, cfg_pp)
        try:
            if host.is_flow(model) if flow is None else flow:
                return sample_in_rf_frame(sampler, student, teacher, x, sigmas, lam, **options)
            return sampler(student, teacher, x, sigmas, lam, **options)
        except (TypeError, ValueError) as e:
            if type(e) not in (TypeError, ValueError) or str(e).startswith(f"{sampler.__name__}: "):
                raise
            raise type(e)(f"{sampler.__name__}: {e}") from e

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
#: (a host's plain one-model student, such as A1111's, has none), so they are added only by name
DEFAULT_NAMES = tuple(name for name, fn in SAMPLERS.items() if not getattr(fn, "cfg_pp", False))


def bind(sampler: Callable, teacher, lam, k: int | None = None, *, guided_steps: Sequence[int] | None = None,
         **options: Any) -> Callable:
    """``sampler`` in k-diffusion's convention ``fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)``.

    The teacher, ``lam``, ``k`` / ``guided_steps`` and any of the sampler's options become
    the defaults of the returned function's keyword parameters (its ``inspect.signature``
    lists every option, as k-diffusion's samplers do); options given at call time override
    them, and a call-time ``k`` or ``guided_steps`` replaces the bound placement. ``teacher``
    may be ``None`` and given at call time. ``lam = 0`` gives a function equal to the plain
    sampler. ``sampler`` must be a kdpp sampler (a value of :data:`kdpp.SAMPLERS`).
    """
    _check_sampler(sampler, "bind")
    hosted = host_sampler(sampler)
    signature = hosted.__signature__
    bound = {"teacher": teacher, "lam": lam, "k": k, "guided_steps": guided_steps, **options}
    unknown = set(bound) - set(signature.parameters)
    if unknown:
        raise TypeError(f"{sampler.__name__} has no option {', '.join(map(repr, sorted(unknown)))}")
    signature = signature.replace(parameters=[p.replace(default=bound[p.name]) if p.name in bound else p
                                              for p in signature.parameters.values()])

    def fn(*args, **kwargs):
        try:
            call = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{sampler.__name__}: {e} (signature {signature})") from None
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
