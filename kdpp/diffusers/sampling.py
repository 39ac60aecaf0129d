"""The one diffusers generation body: a model family hands over denoisers, a schedule and a latent shape.

A *family* (:class:`Family`: :class:`kdpp.diffusers.sdxl.SDXLFamily`,
:class:`kdpp.diffusers.sd3.SD3Family`, :class:`kdpp.diffusers.flux.FluxFamily`,
:class:`kdpp.diffusers.wan.WanFamily`) is built from the student and teacher models, the batch's
conditioning, the student's preset and the output size. It checks them all before any model call and
knows what the family's diffusers pipeline does around its models: how they become VE denoisers
``D(x, sigma, **extra) -> x0`` with their keyword arguments, the latent shape of one image (video),
the VE schedule of the preset, the VE scale of the initial unit noise, and how latents decode.

:func:`sample` is the body every family runs: it reads the run's options (``lam``, ``k`` /
``guided_steps``, ``renoise``, ``renoise_sigma``; the preset's by default), draws the initial noise
(:func:`kdpp.noise.initial_noise`: one CPU generator per image, seeded with its seed, as diffusers'
pipelines draw with a list of CPU generators; or the caller's ``latents``), and hands the preset's
kdpp sampler the denoisers, the schedule and the seeds, nothing else about noise (except a host's own
solver noise, ``noise_sampler``: a diffusers pipeline's scheduler draws). Around the run it
holds the LoRA pairs' adapter state (:meth:`kdpp.diffusers.lora.SharedLoRAModel.session`) and
resets diffusers' cache hooks. :func:`generate` is the one-call form (build, sample, decode) that
each family's ``generate`` forwards to.

Every model call runs as the family's pipeline makes it (:class:`ModelCall`): inside the model's
``cache_context`` where it has one (diffusers' cache hooks, e.g. ``FirstBlockCacheConfig``; the
student in context ``"student"``, the teacher in ``"teacher"``), with the caller's attention
keyword arguments (the pipelines' ``cross_attention_kwargs`` / ``joint_attention_kwargs`` /
``attention_kwargs``, e.g. a LoRA ``scale``). Importing this module does not import diffusers.
"""
from __future__ import annotations

import contextlib
import inspect
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from .._checks import SEED_RANGE, _index, _ints
from ..noise import initial_noise
from ..refine import Denoiser, RenoiseSigma, calls_teacher
from ..solvers import SAMPLERS

#: the cache contexts of the two roles (diffusers' cache hooks keep one state per context name)
STUDENT_CONTEXT, TEACHER_CONTEXT = "student", "teacher"


def model_device(model: Any) -> torch.device:
    """The device of a module's first parameter (the CPU for parameter-less callables)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def model_dtype(model: Any, default: torch.dtype) -> torch.dtype:
    """A model's ``dtype`` (diffusers models have one), else ``default``."""
    dtype = getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else default


def check_type(value: Any, expected: type | tuple[type, ...], name: str) -> None:
    """``TypeError`` naming the argument ``name`` unless ``value`` is an ``expected`` instance."""
    if not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        shown = f" {value!r}" if isinstance(value, (str, numbers.Number)) else ""
        raise TypeError(f"{name} must be a {names}, got {type(value).__name__}{shown}")


def check_seeds(seeds: Any) -> list[int]:
    """``seeds`` as a list of ints, one per image (Python or NumPy ints); errors name ``seeds``.

    A single int is refused (``[seed]`` samples one image): a batch takes one seed per image.
    """
    if _index(seeds) is not None:
        raise TypeError(f"seeds must be a sequence of ints, one per image, got the int {seeds!r} "
                        f"(pass [{seeds!r}] for one image)")
    out = _ints(seeds, "seeds", "a sequence of ints, one per image")
    if not out:
        raise ValueError("seeds must name at least one image")
    for j, seed in enumerate(out):
        if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise ValueError(f"seeds[{j}] = {seed} is out of torch.Generator's range [-2**63, 2**64)")
    return out


#: the text-embedding fields the SDXL and SD3/FLUX conditioning share: (name, ndim, shape)
EMBEDDINGS = (("prompt_embeds", 3, "[batch, tokens, dim]"), ("negative_prompt_embeds", 3, "[batch, tokens, dim]"),
              ("pooled_prompt_embeds", 2, "[batch, dim]"), ("negative_pooled_prompt_embeds", 2, "[batch, dim]"))


def check_embeddings(conditioning: Any, hint: str, fields: Sequence[tuple[str, int, str]] = EMBEDDINGS,
                     negatives_optional: bool = False, tokens_may_differ: bool = False) -> None:
    """Shape checks of a conditioning dataclass; errors name the field and ``hint``.

    ``fields`` lists ``(name, ndim, shape)``; the negatives (``negative_`` + a prompt field) are
    shaped as their prompts (all absent allowed with ``negatives_optional``; their token count,
    dim 1, may differ with ``tokens_may_differ``); one batch size.
    """
    cls = type(conditioning).__name__
    names = [name for name, _, _ in fields]
    negatives = [name for name in names if name.startswith("negative_")]
    for name, ndim, what in fields:
        value = getattr(conditioning, name)
        if value is None and negatives_optional and name in negatives:
            continue
        if not isinstance(value, Tensor):
            raise TypeError(f"{cls}.{name} must be a tensor {what}, got {type(value).__name__} ({hint})")
        if value.ndim != ndim:
            raise ValueError(f"{cls}.{name} must be {what}, got shape {tuple(value.shape)} ({hint})")
    present = [getattr(conditioning, name) is not None for name in negatives]
    if any(present) and not all(present):
        raise ValueError(f"{cls} needs {' and '.join(negatives)}, or none of them")
    if all(present):
        for neg in negatives:
            pos = neg[len("negative_"):]
            a, b = getattr(conditioning, neg).shape, getattr(conditioning, pos).shape
            if (a[:1] + a[2:] != b[:1] + b[2:]) if tokens_may_differ else a != b:
                raise ValueError(f"{cls}.{neg} has shape {tuple(getattr(conditioning, neg).shape)}, "
                                 f"{pos} {tuple(getattr(conditioning, pos).shape)}; they must match"
                                 f"{' but in token count' if tokens_may_differ else ''} ({hint})")
    batch = conditioning.prompt_embeds.shape[0]
    for name in names:
        value = getattr(conditioning, name)
        if value is not None and value.shape[0] != batch:
            raise ValueError(f"{cls}.{name} has batch {value.shape[0]}, prompt_embeds {batch}")


def check_image_size(height: Any, width: Any, multiple: int, why: str) -> None:
    """``height`` and ``width`` must be positive ints and multiples of ``multiple`` (``why`` says whose rule)."""
    for name, size in (("height", height), ("width", width)):
        if _index(size) is None:
            raise TypeError(f"{name} must be an int (pixels), got {size!r}")
        if size <= 0 or size % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple} ({why}), got {size}")


def check_vae(vae: Any, latent_channels: int, models: str, key: str = "latent_channels") -> None:
    """Refuse a VAE whose ``config.<key>`` is not the models' latent channel count."""
    channels = getattr(getattr(vae, "config", None), key, None)
    if channels is None or not callable(getattr(vae, "decode", None)):
        raise TypeError(f"vae must be a diffusers VAE (with decode and config.{key}), got {type(vae).__name__}")
    if channels != latent_channels:
        raise ValueError(f"vae has {channels} latent channels, {models} {latent_channels}: "
                         "the VAE must be the one of the models' latent space")


def check_attention_kwargs(value: Any, name: str) -> dict[str, Any] | None:
    """``None`` or a dict (a copy), else a ``TypeError`` naming ``name``."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of attention keyword arguments (e.g. {{'scale': 0.8}}), "
                        f"got {type(value).__name__}")
    return dict(value)


def guided_step_list(guided_steps: Any) -> list[int] | None:
    """``guided_steps`` read once as a list of ints (an iterator is read more than once after); the core's error otherwise."""
    return None if guided_steps is None else _ints(guided_steps, "guided_steps", "a sequence of step indices")


class ModelCall:
    """A diffusers model called as its pipeline calls it, in one role (student or teacher).

    Each call runs inside ``model.cache_context(context)`` where the model has one (diffusers'
    cache hooks raise "No cache context is set" without it; the state is kept per context name, so
    student and teacher, also one shared LoRA model, never read each other's cache), and gets
    ``attention_kwargs`` under the model's own keyword (``key``: ``cross_attention_kwargs`` for
    UNets, ``joint_attention_kwargs`` for SD3/FLUX, ``attention_kwargs`` for Wan). ``config``,
    ``dtype``, ``device`` and ``parameters`` read through to the model.
    """

    def __init__(self, model: Callable[..., Any], context: str, key: str, attention_kwargs: dict[str, Any] | None):
        self.model, self.context, self.key, self.attention_kwargs = model, context, key, attention_kwargs
        self._cache_context = getattr(model, "cache_context", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.attention_kwargs is not None:
            kwargs[self.key] = dict(self.attention_kwargs)  # a copy per call: models may pop entries (a LoRA "scale")
        if not callable(self._cache_context):
            return self.model(*args, **kwargs)
        with self._cache_context(self.context):
            return self.model(*args, **kwargs)

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)

    @property
    def dtype(self) -> Any:
        return getattr(self.model, "dtype", None)

    @property
    def device(self) -> Any:
        return getattr(self.model, "device", None)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()


@dataclass
class Denoisers:
    """What a family hands the core: the two VE denoisers, their keyword arguments, and the core's ``lam``."""

    student: Denoiser
    teacher: Denoiser | None
    extra_args: dict[str, Any]
    teacher_extra_args: dict[str, Any]
    lam: Any


class Family(ABC):
    """One diffusers model family, bound to its models, conditioning, preset and output size.

    A subclass's constructor checks its arguments (errors name them) and sets:

    - :attr:`preset`: the student's preset (``steps``/``timesteps``, ``sampler``, ``lam``, ``k``, ``renoise``);
    - :attr:`student_model`, :attr:`teacher_model` (``None``: no teacher; only runs that never
      call it are allowed), :attr:`teacher_arg` (the teacher argument's name, for errors);
    - :attr:`shape`: one item's latent shape (``[C, h, w]``, video ``[C, F, h, w]``);
    - :attr:`sigmas`: the VE schedule (float64, decreasing, ending in 0);
    - :attr:`noise_scale`: the VE scale of unit initial noise (``sigma_0``, ``sqrt(1 + sigma_0^2)``
      for VP families started from unit noise, ``1 / (1 - t_0)`` for flow families);
    - :attr:`dtype`, :attr:`device`: the sampler state's.
    """

    name = ""
    teacher_arg = "teacher"
    preset: Any
    student_model: Any
    teacher_model: Any
    shape: tuple[int, ...]
    sigmas: Tensor
    noise_scale: float
    dtype: torch.dtype
    device: torch.device

    @abstractmethod
    def check_batch(self, batch: int) -> None:
        """Refuse conditioning whose batch is not ``batch`` (the number of seeds); errors name both."""

    @abstractmethod
    def denoisers(self, lam: Any, guided: bool) -> Denoisers:
        """The run's denoisers; the teacher's (and what only it needs, e.g. negative embeddings) only when ``guided``."""

    @abstractmethod
    def check_vae(self, vae: Any) -> None:
        """Refuse a VAE of another latent space than the models'."""

    @abstractmethod
    def decode(self, vae: Any, latents: Tensor) -> list:
        """Latents as the family's pipeline decodes them (PIL images; a list of frames per video)."""


@contextlib.contextmanager
def model_sessions(*models: Any, reset_before: bool = True, reset_after: bool = True) -> Iterator[None]:
    """Around a run (or a stage of one): each LoRA pair's adapter session, and diffusers' cache hooks reset
    before the run's first step and after its last."""
    from .lora import AdapterView

    pairs = {id(m.pair): m.pair for m in models if isinstance(m, AdapterView)}
    resets = [m._reset_stateful_cache for m in models if callable(getattr(m, "_reset_stateful_cache", None))]
    with contextlib.ExitStack() as stack:
        for pair in pairs.values():
            stack.enter_context(pair.session())
        if reset_before:
            for reset in resets:
                reset()
        if reset_after:
            stack.callback(lambda: [reset() for reset in resets])
        yield


def sample(
    family: Family, *, seeds: Sequence[int], latents: Tensor | None = None, x: Tensor | None = None, start: int = 0,
    stop: int | None = None, lam: Any = None, k: int | None = None, guided_steps: Sequence[int] | None = None,
    renoise: str | None = None, renoise_sigma: RenoiseSigma = None, callback: Callable[[dict], Any] | None = None,
    disable: bool | None = None, noise_sampler: Callable[[float, float], Tensor] | None = None,
) -> Tensor:
    """Sample one latent per seed with ``family``'s denoisers and its preset's kdpp sampler (or steps ``start`` to ``stop``).

    Args:
        family: the bound family (:class:`Family`).
        seeds: one int per image: its initial noise (:func:`kdpp.noise.initial_noise`: a CPU
            generator seeded with it, unless ``latents`` or ``x`` is given) and every stream the core
            draws from (solver noise, renoise noise, random levels; keyed by the absolute step).
        latents: the initial unit noise ``[len(seeds), *family.shape]`` instead of the seeded one
            (what a pipeline's ``latents=`` or ``generator=`` gives); scaled by ``family.noise_scale``.
        x: the sampler state at step ``start`` (VE frame, what an earlier stage returned) to go on
            from, instead of the initial noise; needed when ``start > 0``.
        start: the first step to sample (an index into ``family.sigmas``).
        stop: the step to stop at (default: the last, ``len(family.sigmas) - 1``). A run sampled in
            stages (``start=0, stop=i``, then ``x=..., start=i``, ...) equals the run in one go (the
            core keys ``k``, ``guided_steps`` and every noise stream on the whole schedule), except
            that DPM++ 2M restarts its second-order history at a stage's first step (and Euler's
            ``s_churn`` is spread over a stage's steps, as in k-diffusion); diffusers'
            cache hooks are reset before step 0 and after the last step only.
        lam: Distillation++ guidance scale (default: the preset's); 0 calls no teacher.
        k: guide the first ``k`` steps (default: the preset's, unless ``guided_steps`` is given).
        guided_steps: the step indices to guide instead (negative ones count from the end).
        renoise: the renoising noise (see :class:`kdpp.TeacherRefinement`; default: the preset's).
        renoise_sigma: the renoising level (default: the core's).
        callback: the sampler's per-step callback (its ``x`` is the VE state).
        disable: disable the progress bar.
        noise_sampler: ``(sigma, sigma_next) -> Tensor``, the solver noise (one draw per call, for
            samplers that draw any) instead of the seeds' solver stream: a host's own, e.g. the
            draws of a diffusers pipeline's scheduler (:mod:`kdpp.diffusers.pipelines`).
    Returns:
        the sampler state at ``stop`` (``[len(seeds), *family.shape]`` in ``family.dtype`` on
        ``family.device``): the final latents at the last step (sigma 0), the VE state before.
    """
    check_type(family, Family, "family")
    seeds = check_seeds(seeds)
    guided_steps = guided_step_list(guided_steps)
    preset = family.preset
    lam = preset.lam if lam is None else lam
    if guided_steps is None and k is None:
        k = preset.k
    renoise = preset.renoise if renoise is None else renoise
    family.check_batch(len(seeds))
    guided = calls_teacher(lam, k, guided_steps)
    if guided and family.teacher_model is None:
        raise ValueError(f"{family.teacher_arg} is None, but this run calls the teacher (lam={lam!r} on "
                         f"{'guided_steps=' + repr(guided_steps) if guided_steps is not None else f'k={k}'}): pass the "
                         "teacher model, or lam=0 (or k=0) for the plain student")
    shape = (len(seeds), *family.shape)
    n_steps = len(family.sigmas) - 1
    stop = n_steps if stop is None else stop
    for name, value in (("start", start), ("stop", stop)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be a step index (int), got {value!r}")
    if not 0 <= start < stop <= n_steps:
        raise ValueError(f"start and stop must satisfy 0 <= start < stop <= {n_steps} (the preset's steps), "
                         f"got start={start}, stop={stop}")
    if x is not None:
        if latents is not None:
            raise ValueError("pass latents (the initial noise) or x (a stage's state), not both")
        if not isinstance(x, Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"x must be the sampler state, a tensor of shape {shape}, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        x = x.to(device=family.device, dtype=family.dtype)
    elif start > 0:
        raise ValueError(f"start={start} needs x, the sampler state an earlier stage returned at that step")
    else:
        if latents is None:
            latents = initial_noise(seeds, shape)
        elif not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
            raise ValueError(f"latents must be a tensor of shape {shape} (one unit-noise latent per seed), got "
                             f"{tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__}")
        x = (latents.float() * family.noise_scale).to(device=family.device, dtype=family.dtype)
    den = family.denoisers(lam, guided)
    options: dict[str, Any] = {"guided_steps": guided_steps} if guided_steps is not None else {}
    if renoise_sigma is not None:
        options["renoise_sigma"] = renoise_sigma
    if (start, stop) != (0, n_steps):
        options.update(full_sigmas=family.sigmas, step_offset=start)
    sampler = SAMPLERS[preset.sampler]
    if noise_sampler is not None and "noise_sampler" in inspect.signature(sampler).parameters:
        options["noise_sampler"] = noise_sampler  # DPM++ 2M (and its CFG++ form) draws none
    with model_sessions(family.student_model, family.teacher_model, reset_before=start == 0,
                        reset_after=stop == n_steps), torch.no_grad():
        return sampler(den.student, den.teacher if guided else None, x, family.sigmas[start:stop + 1], den.lam, k,
                       seed=seeds, extra_args=den.extra_args, teacher_extra_args=den.teacher_extra_args if guided else {},
                       renoise=renoise, disable=disable, callback=callback, **options)


def generate(
    family: type[Family], student_model: Any, teacher_model: Any, conditioning: Any, preset: Any, *,
    seeds: Sequence[int], latents: Tensor | None = None, lam: Any = None, k: int | None = None,
    guided_steps: Sequence[int] | None = None, renoise: str | None = None, renoise_sigma: RenoiseSigma = None,
    vae: Any = None, callback: Callable[[dict], Any] | None = None, disable: bool | None = None,
    **family_options: Any,
) -> Any:
    """Build ``family`` from the models, conditioning, preset and ``family_options``, :func:`sample`, decode.

    The sampling options (``seeds``, ``latents``, ``lam``, ``k``, ``guided_steps``, ``renoise``,
    ``renoise_sigma``, ``callback``, ``disable``) are :func:`sample`'s; ``vae`` decodes the latents
    as the family's pipeline does (else the latents are returned). Everything is checked before
    the first model call.
    """
    run = family(student_model, teacher_model, conditioning, preset, **family_options)
    if vae is not None:
        run.check_vae(vae)
    latents = sample(run, seeds=seeds, latents=latents, lam=lam, k=k, guided_steps=guided_steps, renoise=renoise,
                     renoise_sigma=renoise_sigma, callback=callback, disable=disable)
    return latents if vae is None else run.decode(vae, latents)


def to_pil(images: Tensor) -> list:
    """Decoded images in ``[-1, 1]``, ``[B, C, H, W]``, as a list of PIL images."""
    from PIL import Image

    arrays = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in arrays]


def unscale_latents(vae: Any, latents: Tensor) -> Tensor:
    """The VAE's latents from the model's, as diffusers' pipelines unscale them before ``vae.decode``.

    ``latents * latents_std / scaling_factor + latents_mean`` where the config has
    ``latents_mean`` and ``latents_std`` (per channel; SDXL's and Wan's pipelines; Wan's VAE has no
    scaling factor: 1), else ``latents / scaling_factor + shift_factor`` (no shift where the VAE has
    none: SD/SDXL's).
    """
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    scaling = getattr(config, "scaling_factor", None) or 1.0
    if mean is not None and std is not None:
        per_channel = (1, -1) + (1,) * (latents.ndim - 2)
        mean, std = (torch.tensor(v).view(per_channel).to(latents.device, latents.dtype) for v in (mean, std))
        return latents * std / scaling + mean
    return latents / scaling + (getattr(config, "shift_factor", None) or 0.0)


def execution_device(module: Any, default: torch.device) -> torch.device:
    """Where ``module``'s inputs go: the execution device of its offloading hooks (``enable_model_cpu_offload`` and
    group offloading keep the weights on the CPU between calls), else its own device (diffusers'
    ``get_module_execution_device``; ``module.device``, else ``default``, with a diffusers that lacks it)."""
    try:
        from diffusers.utils.torch_utils import get_module_execution_device
    except ImportError:
        return getattr(module, "device", default)
    return get_module_execution_device(module) if isinstance(module, torch.nn.Module) else getattr(module, "device", default)


def vae_decode(vae: Any, latents: Tensor) -> Tensor:
    """``vae.decode`` of the unscaled latents in the VAE's dtype, on its execution device (:func:`execution_device`).

    A float16 VAE whose ``config.force_upcast`` is set (SDXL's VAE overflows in float16) is cast
    to float32 for the decode and back to float16 afterwards, as the SDXL pipeline does.
    """
    upcast = vae.dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
    with torch.no_grad():
        if upcast:
            vae.to(dtype=torch.float32)
        try:
            z = latents.to(device=execution_device(vae, latents.device), dtype=vae.dtype)
            return vae.decode(unscale_latents(vae, z), return_dict=False)[0]
        finally:
            if upcast:
                vae.to(dtype=torch.float16)


def decode(vae: Any, latents: Tensor) -> list:
    """Image latents as PIL images through ``vae`` (:func:`vae_decode`), as diffusers' image pipelines decode them."""
    return to_pil(vae_decode(vae, latents))
