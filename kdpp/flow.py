"""Rectified-flow (flow-matching) models as VE denoisers, and back.

Rectified flow writes ``x_rf = (1 - t) x0 + t eps`` with ``t in [0, 1]``; dividing by
``1 - t`` gives the VE form ``x_ve = x0 + sigma eps`` with

    sigma = t / (1 - t),     x_ve = x_rf / (1 - t)      (t = sigma / (1 + sigma))

A velocity model predicts ``v = eps - x0 = (x_rf - x0) / t``, an x0-model ``x0``
itself. :class:`FlowDenoiser` wraps either as a VE denoiser, so every kdpp sampler runs
flow students and teachers (mixed with VE ones if they share the data space);
:class:`VelocityModel` goes the other way.

**The start at t = 1.** Flow pipelines (SD3, FLUX) start from pure noise ``x_rf = eps`` at
``t = 1``, which is ``sigma = inf``. kdpp caps the first time at :data:`T_MAX` ``= 1 - 2^-24``,
the largest float32 number below 1 (``sigma_0 = 2^24 - 1``), and starts from
``x_ve = eps / (1 - T_MAX) = 2^24 eps`` (:func:`flow_sigmas`, :func:`initial_noise_scale`):
the model's first input ``x_rf = x_ve / (1 + sigma_0)`` is ``eps`` exactly (a power-of-two
scale), its first time is ``t = 1`` up to float32 rounding (6e-8), and every later step is
the VE form of the RF step up to terms of order ``1 / sigma_0``. Keep the sampler state in
float32 (or wider): ``2^24 eps`` overflows float16 (the diffusers flow families'
``generate`` does, whatever the models' dtype).

**Dtypes.** All frame conversions are computed in ``promote_types(dtype, float32)`` and cast
back, so a float16 / bfloat16 run hands the model the same ``t`` as a float32 run (``t`` is
computed from ``sigma`` in at least float32) and its inputs differ only by rounding.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from ._shape import per_sample, sigma_dtype

#: The first step's time: the largest float32 below 1 (``sigma = 2^24 - 1``). See the module docstring.
T_MAX = 1.0 - 2.0**-24


def sigma_from_t(t: Tensor | float) -> Tensor:
    """``sigma = t / (1 - t)`` (float64 for Python numbers)."""
    t = torch.as_tensor(t, dtype=torch.float64) if not isinstance(t, Tensor) else t
    return t / (1 - t)


def t_from_sigma(sigma: Tensor | float) -> Tensor:
    """``t = sigma / (1 + sigma)`` (float64 for Python numbers)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64) if not isinstance(sigma, Tensor) else sigma
    return sigma / (1 + sigma)


def flow_sigmas(ts: Tensor | Sequence[float], t_max: float = T_MAX) -> Tensor:
    """The VE schedule (float64) of a rectified-flow schedule ``ts`` (decreasing, e.g. a scheduler's ``sigmas``).

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
    return sigma_from_t(ts.clamp(max=t_max))


def initial_noise_scale(ts: Tensor | Sequence[float], t_max: float = T_MAX) -> float:
    """``1 / (1 - t_0)`` with ``t_0`` capped at ``t_max``: the VE scale of the RF start ``x_rf = eps``."""
    return float(1 + flow_sigmas(ts, t_max)[0])


def rf_to_ve(x_rf: Tensor, t: Tensor | float) -> Tensor:
    """``x_ve = x_rf / (1 - t)`` (``t`` a float or one value per batch item)."""
    wide = sigma_dtype(x_rf.dtype)
    t = torch.as_tensor(t, dtype=wide, device=x_rf.device).expand(x_rf.shape[0])
    return (x_rf.to(wide) / per_sample(1 - t, x_rf.to(wide))).to(x_rf.dtype)


def ve_to_rf(x_ve: Tensor, sigma: Tensor | float) -> Tensor:
    """``x_rf = x_ve / (1 + sigma)``."""
    wide = sigma_dtype(x_ve.dtype)
    sigma = torch.as_tensor(sigma, dtype=wide, device=x_ve.device).expand(x_ve.shape[0])
    return (x_ve.to(wide) / per_sample(1 + sigma, x_ve.to(wide))).to(x_ve.dtype)


class FlowDenoiser:
    r"""A rectified-flow model ``f(x_rf, t, **extra)`` as a VE denoiser ``D(x_ve, sigma)``.

    ``prediction="velocity"``: ``D = x_rf - t * v(x_rf, t)``; ``"x0"``: ``D = f(x_rf, t)``,
    with ``t = sigma / (1 + sigma)`` and ``x_rf = x_ve / (1 + sigma)``. ``t`` reaches the model as
    a ``[batch]`` tensor in ``promote_types(sigma.dtype, float32)`` (the same values for a float16,
    bfloat16 or float32 ``x``), ``x_rf`` in the dtype of ``x``; ``D`` is returned in the dtype of ``x``.
    """

    def __init__(self, model: Callable[..., Tensor], prediction: str = "velocity"):
        if prediction not in ("velocity", "x0"):
            raise ValueError(f"prediction must be 'velocity' or 'x0', got {prediction!r}")
        self.model, self.prediction = model, prediction

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        sigma = sigma.to(sigma_dtype(sigma.dtype))
        t = sigma / (1 + sigma)
        wide = sigma_dtype(x.dtype)
        x_rf = x.to(wide) / per_sample(1 + sigma, x.to(wide))
        out = self.model(x_rf.to(x.dtype), t, **extra)
        if self.prediction == "x0":
            return out.to(x.dtype)
        return (x_rf - per_sample(t, x_rf) * out.to(wide)).to(x.dtype)


class VelocityModel:
    r"""A VE denoiser ``D(x_ve, sigma)`` as a rectified-flow velocity model ``v(x_rf, t) = (x_rf - x0) / t``."""

    def __init__(self, denoiser: Callable[..., Tensor]):
        self.denoiser = denoiser

    def __call__(self, x_rf: Tensor, t: Tensor, **extra) -> Tensor:
        t = t.to(sigma_dtype(t.dtype))
        sigma = t / (1 - t)
        wide = sigma_dtype(x_rf.dtype)
        x0 = self.denoiser((x_rf.to(wide) / per_sample(1 - t, x_rf.to(wide))).to(x_rf.dtype), sigma, **extra)
        return ((x_rf.to(wide) - x0.to(wide)) / per_sample(t, x_rf.to(wide))).to(x_rf.dtype)


class RFHostFrame:
    r"""Run a VE sampler for a host that keeps ``x`` in the rectified-flow frame.

    Hosts such as ComfyUI (CONST models: SD3, FLUX, ...) hand a sampler ``x_rf``, a schedule
    ``ts = [t_0 > ... > t_N]`` with ``t in [0, 1]`` and x0 denoisers ``D(x_rf, t)``. This
    converts at the boundary: ``sigmas = t / (1 - t)``, ``x_ve = x_rf / (1 - t_0)``, denoisers
    ``D_ve(x_ve, sigma) = D(x_ve / (1 + sigma), sigma / (1 + sigma))`` (x0 is frame-free) and the
    result back with ``x_rf = x_ve / (1 + sigma_N)``; callbacks get the host-frame ``x`` and ``t`` (``sigma``,
    ``sigma_hat`` and ``renoise_sigma`` all in the host's ``t``).

    ``t = 1`` (pure noise, ``sigma = inf``) is capped at ``t_max = 1 - 1e-9`` (:func:`flow_sigmas`;
    tighter than :data:`T_MAX` because the VE run is done in float64 here): the capped first step
    differs from the exact limit by about ``1e-9`` relative, and the model still receives ``t = 1``
    as the host would (``1 - 1e-9`` rounds to 1 in float32). Models receive ``x`` in the host's
    dtype and ``t`` in the dtype of ``ts``.
    """

    T_MAX = 1 - 1e-9

    def __init__(self, ts: Tensor, x_rf: Tensor):
        self.x_dtype, self.t_dtype = x_rf.dtype, ts.dtype
        self.sigmas = flow_sigmas(ts, self.T_MAX)

    def to_ve(self, x_rf: Tensor) -> Tensor:
        """The initial sample in the VE frame (float64)."""
        return x_rf.to(torch.float64) * (1 + self.sigmas[0])

    def to_rf(self, x_ve: Tensor, sigma: Tensor | float) -> Tensor:
        """``x_ve / (1 + sigma)`` in the host's dtype."""
        return (x_ve / (1 + sigma)).to(self.x_dtype)

    def denoiser(self, model: Callable[..., Tensor] | None):
        """``model(x_rf, t, **extra) -> x0`` as a float64 VE denoiser (``guided_and_uncond`` kept, ``None`` kept)."""
        return None if model is None else _RFModel(model, self)

    def callback(self, callback: Callable[[dict], object] | None):
        """``callback`` fed the host's frame: ``x`` as ``x_rf``, ``sigma``/``sigma_hat`` as ``t``, ``renoise_sigma``
        (on steps that called the teacher) as the renoise level's ``t`` (a float, or a ``[B]`` tensor with
        per-item random levels), x0s in the host dtype."""
        if callback is None:
            return None

        def fn(info: dict) -> object:
            info = dict(info)
            sigma_hat = float(info["sigma_hat"])
            info["x"] = self.to_rf(info["x"], sigma_hat)
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


class _RFModel:
    """An RF-frame x0 model seen as a float64 VE denoiser (see :class:`RFHostFrame`)."""

    def __init__(self, model: Callable[..., Tensor], frame: RFHostFrame):
        self.model, self.frame = model, frame

    def _args(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        s = sigma.to(torch.float64)
        return (x / (1 + per_sample(s, x))).to(self.frame.x_dtype), (s / (1 + s)).to(self.frame.t_dtype)

    def __call__(self, x: Tensor, sigma: Tensor, **extra) -> Tensor:
        return self.model(*self._args(x, sigma), **extra).to(x.dtype)

    def __getattr__(self, name: str):
        if name != "guided_and_uncond" or not hasattr(self.model, name):
            raise AttributeError(name)

        def guided_and_uncond(x: Tensor, sigma: Tensor, **extra) -> tuple[Tensor, Tensor]:
            guided, uncond = self.model.guided_and_uncond(*self._args(x, sigma), **extra)
            return guided.to(x.dtype), uncond.to(x.dtype)

        return guided_and_uncond


def sample_in_rf_frame(sampler: Callable[..., Tensor], student, teacher, x_rf: Tensor, ts: Tensor, *args,
                       callback: Callable[[dict], object] | None = None, **kwargs) -> Tensor:
    """``sampler(student, teacher, x, sigmas, *args, **kwargs)`` (a kdpp sampler) run for an RF-frame host.

    ``student`` and ``teacher`` (or a list of teachers) are RF x0 models ``D(x_rf, t)``; see
    :class:`RFHostFrame`. Solver noise samplers passed in ``kwargs`` keep their stream (build
    them from ``x_rf``); each noise-adding step then reads ``x' = (1 - t') D + t' z`` in RF.
    """
    frame = RFHostFrame(ts, x_rf)
    teacher_ve = [frame.denoiser(t) for t in teacher] if isinstance(teacher, (list, tuple)) else frame.denoiser(teacher)
    out = sampler(frame.denoiser(student), teacher_ve, frame.to_ve(x_rf), frame.sigmas, *args,
                  callback=frame.callback(callback), **kwargs)
    return frame.to_rf(out, frame.sigmas[-1])
