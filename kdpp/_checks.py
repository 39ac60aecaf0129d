"""Input validation shared by every sampler: one place for every error message."""
from __future__ import annotations

import inspect
import numbers
import operator
import os
import sys
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor


def check_x(x: Tensor) -> None:
    """`x` must be a finite floating-point tensor with a batch dimension."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must have a non-empty batch dimension first, got shape {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")


def check_sigmas(sigmas: Tensor | Sequence[float], name: str = "sigmas") -> list[float]:
    """Validate a noise schedule and return it as Python floats.

    The schedule must be 1-D, at least two entries, finite, strictly decreasing, with every
    entry but the last positive. The last entry may be 0 (a full sampling run) or positive
    (the run stops at that noise level, as k-diffusion allows: hosts split one schedule into
    stages that way). Errors name the argument ``name``.
    """
    if isinstance(sigmas, Tensor):
        s = sigmas.detach()
    else:
        try:
            if isinstance(sigmas, (str, bytes)) or sigmas is None:
                raise TypeError
            s = torch.as_tensor(sigmas, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a 1-D tensor or a sequence of numbers (a noise schedule, e.g. "
                            f"kdpp.schedules.karras_sigmas(...)), got {sigmas!r}") from None
    if s.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(s.shape)}")
    if s.numel() < 2:
        raise ValueError(f"{name} must have at least 2 entries (a schedule of N steps has N + 1 levels), got "
                         f"{s.tolist()}")
    if not s.is_floating_point():
        s = s.double()
    values = s.cpu().double().tolist()
    if not all(v == v and abs(v) != float("inf") for v in values):
        raise ValueError(f"{name} must be finite, got {values}")
    if any(a <= b for a, b in zip(values, values[1:])):
        flipped = " (it is increasing: pass it reversed, e.g. sigmas.flip(0))" if values[0] < values[-1] else ""
        raise ValueError(f"{name} must be strictly decreasing{flipped}, got {values}")
    if values[-1] < 0:
        raise ValueError(f"{name} must be positive except the last, which may be 0; got {values}")
    return values


def check_k(k: int | None) -> int | None:
    """`k`, the number of guided steps, is a non-negative integer or None."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a non-negative int, got {k!r}")
    if k < 0:
        raise ValueError(f"k must be a non-negative int, got {k}")
    return int(k)


def _index(value: Any) -> int | None:
    """``value`` as an int if it is an integer (Python, NumPy, 0-d integer tensor), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _ints(values: Any, name: str, what: str) -> list[int]:
    """``values`` (any iterable but a string or a dict) as a list of ints; errors name ``name``."""
    if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be {what}, got {values!r}")
    out = []
    for j, value in enumerate(values):
        i = _index(value)
        if i is None:
            raise TypeError(f"{name}[{j}] must be an int, got {value!r}")
        out.append(i)
    return out


def guided_step_indices(k: int | None, guided_steps: Iterable[int] | None, n_steps: int) -> list[int]:
    """The guided steps of a run of ``n_steps`` steps, in the order of ``guided_steps`` (the first ``k``: increasing).

    ``guided_steps`` lists step indices (negative ones count from the end); without it the
    first ``k`` steps are guided (``k = None``: 1). Giving both is an error. A per-step
    ``lam`` list pairs with the steps in this order.
    """
    k = check_k(k)
    if guided_steps is None:
        return list(range(min(1 if k is None else k, n_steps)))
    if k is not None:
        raise ValueError(f"give k or guided_steps, not both (got k={k!r} and guided_steps={guided_steps!r})")
    given = _ints(guided_steps, "guided_steps", "a sequence of step indices")
    for j, i in enumerate(given):
        if not -n_steps <= i < n_steps:
            raise ValueError(f"guided_steps[{j}] = {i} is out of range for a schedule of {n_steps} steps "
                             f"(valid: 0 .. {n_steps - 1}, or -{n_steps} .. -1 from the end)")
    steps = [i % n_steps for i in given]
    if len(set(steps)) != len(steps):
        raise ValueError(f"guided_steps must not repeat a step, got {given} (steps {steps} of {n_steps})")
    return steps


#: the seeds ``torch.Generator.manual_seed`` accepts
SEED_RANGE = (-2**63, 2**64 - 1)


def check_seed(seed: Any, name: str, batch: int | None) -> int | list[int]:
    """A seed: one int, or one int per batch item (``batch`` of them; ``None``: not checked yet)."""
    single = _index(seed)
    seeds = [single] if single is not None else _ints(seed, name, "an int or one int per batch item")
    for j, s in enumerate(seeds):
        if not SEED_RANGE[0] <= s <= SEED_RANGE[1]:
            raise ValueError(f"{name if single is not None else f'{name}[{j}]'} = {s} is out of range for a torch "
                             f"seed (valid: {SEED_RANGE[0]} .. {SEED_RANGE[1]})")
    if single is not None:
        return single
    if batch is not None and len(seeds) != batch:
        raise ValueError(f"{name} has {len(seeds)} entries, expected one per batch item ({batch})")
    return seeds


def check_kwargs(value: Any, name: str) -> Mapping[str, Any]:
    """Keyword arguments for a model: a dict (``None`` is an empty one)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict of keyword arguments, got {type(value).__name__}: {value!r}")
    return value


def check_callable(value: Any, name: str, optional: bool = True) -> Any:
    """A callable (or ``None`` where ``optional``)."""
    if value is None and optional:
        return None
    if not callable(value):
        raise TypeError(f"{name} must be a callable{' or None' if optional else ''}, got {value!r}")
    return value


def check_denoiser_call(fn: Callable, who: str, kwargs: Mapping[str, Any], kwargs_name: str, fix: str = "") -> None:
    """Refuse, before sampling, a denoiser ``who`` that cannot be called as ``fn(x, sigma, **kwargs)``.

    The error names the model, the keyword arguments' source ``kwargs_name`` and ``fix``; callables
    without an introspectable signature are found out at the call.
    """
    try:
        params = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        params.bind(None, None, **kwargs)
    except TypeError as e:
        given = f"with {kwargs_name} keys {', '.join(map(repr, kwargs))}" if kwargs else "with no keyword arguments"
        raise TypeError(f"the {who} cannot be called as {who}(x, sigma, **{kwargs_name}) {given}: {e} "
                        f"({getattr(fn, '__name__', type(fn).__name__)}{params}){fix}") from None


#: the interval of ``lam`` without a warning: 0 is the student, 1 the teacher's own estimate
LAM_RANGE = (0.0, 2.0)


def warn_unusual_lam(value: float, name: str) -> None:
    """Warn when ``lam`` lies outside :data:`LAM_RANGE`: it is an interpolation weight, not a CFG scale."""
    if not LAM_RANGE[0] <= value <= LAM_RANGE[1]:
        warn_caller(f"{name}={value:g} is outside {LAM_RANGE[0]:g} .. {LAM_RANGE[1]:g}: lam interpolates the student's "
                    "estimate (0) toward the teacher's (1), typically 0.05 .. 1 (it is not a CFG scale); above 1 "
                    "it extrapolates past the teacher, below 0 away from it")


def check_arity(fn: Callable, name: str, n_args: int, signature: str) -> None:
    """A callable option must accept ``n_args`` positional arguments (checked on its signature, not by calling it)."""
    try:
        params = inspect.signature(fn)
    except (TypeError, ValueError):  # no introspectable signature (some builtins): found out at the call
        return
    try:
        params.bind(*range(n_args))
    except TypeError:
        raise TypeError(f"{name} must be a callable {signature}; {getattr(fn, '__name__', fn)!r} has signature "
                        f"{params}") from None


def check_finite_number(value, name: str, *, minimum: float | None = None, allow_inf: bool = False) -> float:
    """A real number (Python, NumPy or 0-d tensor): finite (or +-inf where ``allow_inf``), never NaN, ``>= minimum``."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise TypeError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if value != value or (not allow_inf and abs(value) == float("inf")):
        raise ValueError(f"{name} must be {'a number (not NaN)' if allow_inf else 'finite'}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value}")
    return value


#: how each k-diffusion solver option is validated (keyword arguments of check_finite_number)
SOLVER_OPTIONS = {"eta": {"minimum": 0}, "s_noise": {}, "s_churn": {"minimum": 0},
                  "s_tmin": {"allow_inf": True}, "s_tmax": {"allow_inf": True}}


def check_solver_options(**options: float) -> list[float]:
    """k-diffusion's solver options (``eta``, ``s_noise``, ``s_churn``, ``s_tmin``, ``s_tmax``) as floats, in order."""
    return [check_finite_number(value, name, **SOLVER_OPTIONS[name]) for name, value in options.items()]


class OutputChecker:
    """Checks every model output: shape and dtype at once, finiteness at the end.

    An output in a wider floating-point type than ``x`` (float32 for a bf16 ``x``) is cast
    to ``x``'s dtype; a narrower, integer or complex one is refused.

    Finiteness is recorded as the output's sum (NaN and inf propagate into it;
    half types are summed in float32) written into one preallocated device
    buffer, read once when the run finishes: the loop never waits on the device,
    pays one reduction per call, and keeps no per-call allocation alive (many
    small live tensors between large freed ones fragment the CPU heap, which
    made peak memory grow with the number of steps).
    """

    def __init__(self, x: Tensor, capacity: int = 64):
        self.shape, self.dtype = x.shape, x.dtype
        self.sums = torch.empty(capacity, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                                device=x.device)
        self.count = 0
        self.where: list[str] = []

    def __call__(self, out, who: str, i: int, sigma: float | str, level: str = "sigma") -> Tensor:
        """Check the output ``out`` of ``who`` called at step ``i`` at the noise level ``sigma`` (named ``level``)."""
        return self.output(out, f"{who} at step {i} ({level}={sigma if isinstance(sigma, str) else format(sigma, '.6g')})")

    def checked_sampler(self, sampler: Callable[[float, float], Tensor], name: str) -> Callable[[float, float], Tensor]:
        """``sampler`` (a noise sampler the user passed as option ``name``) with each draw checked like a model output.

        Noise in any floating-point dtype is accepted and cast to ``x``'s (as adding it to ``x`` would).
        """

        def sample(sigma: float, sigma_next: float) -> Tensor:
            return self.output(sampler(sigma, sigma_next), f"{name}({sigma:.6g}, {sigma_next:.6g})", any_float=True)

        return sample

    def output(self, out, where: str, any_float: bool = False) -> Tensor:
        """Check ``out`` (described as ``where`` in errors): its shape and dtype now, its finiteness at the end.

        ``any_float`` accepts a narrower floating-point dtype too (cast to ``x``'s).
        """
        if not isinstance(out, Tensor):
            raise TypeError(f"{where} returned {type(out).__name__}, expected a torch.Tensor")
        if out.shape != self.shape:
            raise ValueError(f"{where} returned shape {tuple(out.shape)}, expected {tuple(self.shape)} (the shape of x)")
        if out.dtype != self.dtype:
            # a model may compute in a wider float type (float32 for a bf16 x, as k-diffusion allows)
            if not out.is_floating_point() or not (any_float or torch.promote_types(out.dtype, self.dtype) == out.dtype):
                raise TypeError(f"{where} returned dtype {out.dtype}, expected {self.dtype} (the dtype of x) "
                                f"or a {'' if any_float else 'wider '}floating-point type")
            out = out.to(self.dtype)
        if self.count == len(self.sums):
            self.sums = torch.cat([self.sums, torch.empty_like(self.sums)])
        self.sums[self.count] = out.sum(dtype=self.sums.dtype)
        self.count += 1
        self.where.append(where)
        return out

    def raise_if_nonfinite(self) -> None:
        ok = self.sums[: self.count].isfinite().cpu()
        if not bool(ok.all()):
            first = int((~ok).nonzero()[0])
            raise FloatingPointError(f"{self.where[first]} returned NaN or inf")


class KdppWarning(UserWarning):
    """The category of every warning kdpp issues (a ``UserWarning``), so a host can route or filter them.

    ``warnings.filterwarnings("ignore", category=kdpp.KdppWarning)`` silences kdpp's warnings alone; kdpp warns
    about a ``lam`` outside 0 .. 2 and about guided steps that call no teacher (their renoise level is 0).
    """


def warn_caller(message: str) -> None:
    """``warnings.warn(message, KdppWarning)`` attributed to the first caller outside kdpp (and torch's ``no_grad`` wrapper)."""
    level, frame = 2, sys._getframe(1)  # stacklevel 2 is the frame that called warn_caller
    while frame is not None and (frame.f_globals.get("__name__", "").split(".")[0] == "kdpp"
                                 or frame.f_code.co_filename.endswith(os.path.join("torch", "utils", "_contextlib.py"))):
        level, frame = level + 1, frame.f_back
    warnings.warn(message, KdppWarning, stacklevel=level)
