"""Rectified-flow (flow-matching) models as VE denoisers, and VE samplers for hosts that keep ``x`` in the RF frame.

Rectified flow writes ``x_rf = (1 - t) x0 + t eps`` with ``t in [0, 1]``; dividing by
``1 - t`` gives the VE form ``x_ve = x0 + sigma eps`` with

    sigma = t / (1 - t),     x_ve = x_rf / (1 - t)      (t = sigma / (1 + sigma))

A velocity model predicts ``v = eps - x0 = (x_rf - x0) / t``, an x0-model ``x0``
itself. :class:`FlowDenoiser` wraps either as a VE denoiser, so every kdpp sampler runs
flow students and teachers (mixed with VE ones if they share the data space);
:func:`sample_in_rf_frame` runs a VE sampler for a host whose ``x`` and schedule are RF-framed.

**The start at t = 1.** Flow pipelines (SD3, FLUX) and hosts (ComfyUI's CONST models) start
from pure noise ``x_rf = eps`` at ``t = 1``, which is ``sigma = inf``. kdpp caps the first time
at :data:`T_MAX` ``= 1 - 2^-30`` (``sigma_0 = 2^30 - 1``) and starts from
``x_ve = eps / (1 - T_MAX) = 2^30 eps`` (:func:`flow_sigmas`, :func:`initial_noise_scale`): the
model's first input ``x_rf = x_ve / (1 + sigma_0)`` is ``eps`` exactly (a power-of-two scale),
its first time ``t = 1 - 2^-30`` rounds to exactly 1 in float32 (and in half precision), so a
float32 model sees the host's own first call, and every later step is the VE form of the RF step
up to terms of order ``2^-30``. Keep the sampler state in float32 or wider: ``2^30 eps``
overflows float16 (the diffusers flow families and :func:`sample_in_rf_frame` do).

**Dtypes.** Frame conversions are computed in ``promote_types(x.dtype, sigma.dtype, float32)``
and the model gets ``x_rf`` and ``t`` cast to the dtypes its host uses, so a float16 / bfloat16
run hands the model the same ``t`` as a float32 run and inputs that differ only by rounding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ._shape import per_sample, sigma_dtype

#: The first step's time, ``1 - 2^-30`` (``sigma = 2^30 - 1``): exactly 1 in float32. See the module docstring.
T_MAX = 1.0 - 2.0**-30

PREDICTIONS = ("velocity", "x0")


def flow_sigmas(ts: Tensor | Sequence[float], t_max: float = T_MAX) -> Tensor:
    """The VE schedule ``sigma = t / (1 - t)`` (float64) of a rectified-flow schedule ``ts`` (decreasing, e.g. a scheduler's ``sigmas``).

    Times above ``t_max`` (the pipelines' first ``t = 1``) are capped at ``t_max``; a final
    ``t = 0`` stays 0.
    """
    ts = torch.as_tensor(ts).detach().to(device="cpu", dtype=torch.float64)
    if ts.ndim != 1 or ts.numel() == 0:
        raise ValueError(f"ts must be a non-empty 1-D schedule, got shape {tuple(ts.shape)}")
    if not 0 < t_max < 1:
        raise ValueError(f"t_max must be in (0, 1), got {t_max}")
    if bool((ts < 0).any()) or bool((ts > 1).any()):
        raise ValueError(f"ts must lie in [0, 1], got {ts.tolist()}")
    ts = ts.clamp(max=t_max)
    return ts / (1 - ts)


def initial_noise_scale(ts: Tensor | Sequence[float], t_max: float = T_MAX) -> float:
    """``1 / (1 - t_0)`` with ``t_0`` capped at ``t_max``: the VE scale of the RF start ``x_rf = eps``."""
    return float(1 + flow_sigmas(ts, t_max)[0])


class FlowDenoiser:
    r"""A rectified-flow model ``f(x_rf, t, **extra)`` as a VE denoiser ``D(x_ve, sigma)``.

    With ``t = sigma / (1 + sigma)`` and ``x_rf = x_ve / (1 + sigma)``:
    ``prediction="velocity"``: ``D = x_rf - t * v(x_rf, t)``; ``"x0"``: ``D = f(x_rf, t)``.
    The conversions are computed in ``promote_types(x.dtype, sigma.dtype, float32)``; the model
    gets ``x_rf`` in ``x_dtype`` (default: ``x``'s dtype) and ``t`` as a ``[batch]`` tensor in
    ``t_dtype`` (default: that wide dtype, float32 or better), so a float16, bfloat16 or float32
    ``x`` hands it the same ``t``; ``D`` is returned in ``x``'s dtype. A model with
    ``guided_and_uncond(x_rf, t, **extra) -> (guided, uncond)`` (a CFG student for CFG++) keeps it,
    converted the same way.
    """

    def __init__(self, model: Callable[..., Tensor], prediction: str = "velocity", *,
                 x_dtype: torch.dtype | None = None, t_dtype: torch.dtype | None = None):
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        if not callable(model):
            raise TypeError(f"model must be a callable f(x_rf, t, **extra), got {type(model).__name__}")
        self.model, self.prediction, self.x_dtype, self.t_dtype = model, prediction, x_dtype, t_dtype
        if callable(getattr(model, "guided_and_uncond", None)):
            self.guided_and_uncond = self._guided_and_uncond

    def _frame(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(x_rf, t)`` in the wide dtype and as the model gets them."""
        wide = torch.promote_types(sigma_dtype(x.dtype), sigma.dtype)
        s = sigma.to(wide)
        t, x_rf = s / (1 + s), x.to(wide) / per_sample(1 + s, x.to(wide))
        return x_rf, t, x_rf.to(self.x_dtype or x.dtype), t.to(self.t_dtype or wide)

    def _x0(self, out: Tensor, x_rf: Tensor, t: Tensor, dtype: torch.dtype) -> Tensor:
        if self.prediction == "x0":
            return out.to(dtype)
        return (x_rf - per_sample(t, x_rf) * out.to(x_rf.dtype)).to(dtype)

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        x_rf, t, model_x, model_t = self._frame(x, sigma)
        return self._x0(self.model(model_x, model_t, **extra), x_rf, t, x.dtype)

    def _guided_and_uncond(self, x: Tensor, sigma: Tensor, **extra) -> tuple[Tensor, Tensor]:
        x_rf, t, model_x, model_t = self._frame(x, sigma)
        guided, uncond = self.model.guided_and_uncond(model_x, model_t, **extra)
        return self._x0(guided, x_rf, t, x.dtype), self._x0(uncond, x_rf, t, x.dtype)


class RFHostFrame:
    r"""Run a VE sampler for a host that keeps ``x`` in the rectified-flow frame.

    Hosts such as ComfyUI (CONST models: SD3, FLUX, ...) hand a sampler ``x_rf``, a schedule
    ``ts = [t_0 > ... > t_N]`` with ``t in [0, 1]`` and x0 denoisers ``D(x_rf, t)``. This
    converts at the boundary: ``sigmas = t / (1 - t)`` (:func:`flow_sigmas`, ``t = 1`` capped at
    :data:`T_MAX`), ``x_ve = x_rf / (1 - t_0)`` in float64, denoisers
    ``FlowDenoiser(D, "x0")`` with the host's ``x`` and ``t`` dtypes, and the result back with
    ``x_rf = x_ve / (1 + sigma_N)``; callbacks get the host-frame ``x`` and ``t`` (``sigma``,
    ``sigma_hat`` and ``renoise_sigma`` all in the host's ``t``).
    """

    def __init__(self, ts: Tensor, x_rf: Tensor):
        self.x_dtype, self.t_dtype = x_rf.dtype, ts.dtype
        self.sigmas = flow_sigmas(ts)

    def to_ve(self, x_rf: Tensor) -> Tensor:
        """The initial sample in the VE frame (float64)."""
        return x_rf.to(torch.float64) * (1 + self.sigmas[0])

    def to_rf(self, x_ve: Tensor, sigma: Tensor | float) -> Tensor:
        """``x_ve / (1 + sigma)`` in the host's dtype."""
        return (x_ve / (1 + sigma)).to(self.x_dtype)

    def denoiser(self, model: Callable[..., Tensor] | None) -> FlowDenoiser | None:
        """``model(x_rf, t, **extra) -> x0`` as a float64 VE denoiser (``None`` kept)."""
        return None if model is None else FlowDenoiser(model, "x0", x_dtype=self.x_dtype, t_dtype=self.t_dtype)

    def callback(self, callback: Callable[[dict], object] | None):
        """``callback`` fed the host's frame: ``x`` as ``x_rf``, ``sigma``/``sigma_hat`` as ``t``, ``renoise_sigma``
        (on steps that called the teacher) as the renoise level's ``t`` (a float, or a ``[B]`` tensor with
        per-item random levels), x0s in the host dtype."""
        if callback is None:
            return None

        def fn(info: dict) -> object:
            info = dict(info)
            info["x"] = self.to_rf(info["x"], info["sigma_hat"])  # a tensor: no host sync per step
            for key in ("sigma", "sigma_hat"):
                s = torch.as_tensor(info[key], dtype=torch.float64)
                info[key] = (s / (1 + s)).to(self.t_dtype)
            tau = info.get("renoise_sigma")  # a float, or a [B] tensor with per-item random levels
            if tau is not None:
                info["renoise_sigma"] = tau / (1 + tau)
            for key in ("denoised", "student_denoised", "teacher_denoised"):
                if isinstance(info.get(key), Tensor):
                    info[key] = info[key].to(self.x_dtype)
            return callback(info)

        return fn


def sample_in_rf_frame(sampler: Callable[..., Tensor], student, teacher, x_rf: Tensor, ts: Tensor, *args,
                       callback: Callable[[dict], object] | None = None, full_sigmas: Tensor | None = None,
                       **kwargs) -> Tensor:
    """``sampler(student, teacher, x, sigmas, *args, **kwargs)`` (a kdpp sampler) run for an RF-frame host.

    ``student`` and ``teacher`` (or a list of teachers) are RF x0 models ``D(x_rf, t)``; see
    :class:`RFHostFrame`. ``full_sigmas`` (a split run's whole schedule) is in the host's ``t`` too.
    Solver noise samplers passed in ``kwargs`` keep their stream (build them from ``x_rf``); each
    noise-adding step then reads ``x' = (1 - t') D + t' z`` in RF.
    """
    frame = RFHostFrame(ts, x_rf)
    teacher_ve = [frame.denoiser(t) for t in teacher] if isinstance(teacher, (list, tuple)) else frame.denoiser(teacher)
    full = None if full_sigmas is None else flow_sigmas(full_sigmas)
    out = sampler(frame.denoiser(student), teacher_ve, frame.to_ve(x_rf), frame.sigmas, *args,
                  callback=frame.callback(callback), full_sigmas=full, **kwargs)
    return frame.to_rf(out, frame.sigmas[-1])
