"""Classifier-free guidance as a VE denoiser, with cond and uncond in one batched call."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._checks import check_finite_number
from ._shape import model_sigma


def _cat(uncond: Any, cond: Any, path: str) -> Any:
    """Concatenate two conditioning trees leaf by leaf on dim 0 (uncond first)."""
    if isinstance(cond, Tensor) and cond.ndim > 0:
        if not isinstance(uncond, Tensor) or uncond.shape[1:] != cond.shape[1:]:
            raise ValueError(f"cond{path} and uncond{path} must be tensors of matching shape after dim 0, "
                             f"got {tuple(cond.shape)} and {getattr(uncond, 'shape', type(uncond).__name__)}")
        return torch.cat([uncond, cond])
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(cond) != set(uncond):
            raise ValueError(f"cond{path} and uncond{path} must be dicts with the same keys")
        return {key: _cat(uncond[key], cond[key], f"{path}[{key!r}]") for key in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(cond) != len(uncond):
            raise ValueError(f"cond{path} and uncond{path} must be sequences of the same length")
        return type(cond)(_cat(u, c, f"{path}[{j}]") for j, (u, c) in enumerate(zip(uncond, cond)))
    same = torch.equal(cond, uncond) if isinstance(cond, Tensor) and isinstance(uncond, Tensor) else cond == uncond
    if not same:
        raise ValueError(f"cond{path} and uncond{path} are non-batched values and must be equal, got {cond!r} and {uncond!r}")
    return cond


class CFGDenoiser:
    r"""``D_w(x, s) = D_u + scale * (D_c - D_u)`` from one batched call of ``model``.

    ``model(x, sigma, **kwargs)`` is a VE denoiser. The conditional and
    unconditional keyword arguments arrive at call time as ``cond`` and
    ``uncond``: dicts of model kwargs whose leaves are tensors (or nested
    dicts / lists / tuples of them), concatenated on dim 0 as ``[uncond, cond]``
    with ``x`` and ``sigma`` doubled to match; non-tensor (and 0-d) leaves must
    be equal in both and pass through. With ``cond_key`` set, ``cond`` and
    ``uncond`` may be bare tensors (or trees), passed as ``model(..., cond_key=...)``.
    Any other keyword arguments go to the model unchanged (they must not be
    per-sample tensors).

    The model gets ``sigma`` in float32 or better (``sigma``'s own dtype, promoted with
    ``torch.promote_types(x.dtype, torch.float32)``), never in half precision.

    ``scale = 1`` evaluates only the conditional branch, ``scale = 0`` only the
    unconditional one. For CFG++ samplers, :meth:`guided_and_uncond` returns
    ``(D_w, D_u)`` (CFG++ uses small scales, typically in ``[0, 1]``).

    Example (teacher with CFG 7.5, student without)::

        teacher = kdpp.CFGDenoiser(teacher_model, scale=7.5)
        kdpp.sample_euler_distpp(student, teacher, x, sigmas, lam=0.5,
            extra_args={"encoder_hidden_states": c},
            teacher_extra_args={"cond": {"encoder_hidden_states": c},
                                "uncond": {"encoder_hidden_states": u}})
    """

    def __init__(self, model: Callable[..., Tensor], scale: float, cond_key: str | None = None):
        if not callable(model):
            raise TypeError(f"model must be a callable denoiser, got {model!r}")
        self.model = model
        self.scale = check_finite_number(scale, "scale")
        self.cond_key = cond_key

    def _require(self, cond: Any, uncond: Any, both: bool = False) -> None:
        """``cond`` (unless ``scale = 0``) and ``uncond`` (unless ``scale = 1``) must be given."""
        missing = [name for name, v, needed in (("cond", cond, both or self.scale != 0),
                                                ("uncond", uncond, both or self.scale != 1)) if needed and v is None]
        if missing:
            raise ValueError(
                f"CFGDenoiser (scale {self.scale:g}) was called without {' and '.join(missing)}: it needs the keyword "
                "arguments cond= and uncond= (dicts of model kwargs). Pass them to a kdpp sampler as teacher_extra_args={'cond': ..., "
                "'uncond': ...} for a CFG teacher (extra_args= for a CFG student, or a k-diffusion sampler)")

    def _kwargs(self, c: Any, name: str) -> Mapping[str, Any]:
        if self.cond_key is not None:
            return {self.cond_key: c}
        if not isinstance(c, Mapping):
            raise TypeError(f"{name} must be a dict of model kwargs (or set cond_key), got {type(c).__name__}")
        return c

    def _both(self, x: Tensor, sigma: Tensor, cond: Any, uncond: Any, kwargs: dict) -> tuple[Tensor, Tensor]:
        both = _cat(self._kwargs(uncond, "uncond"), self._kwargs(cond, "cond"), "")
        out = self.model(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **kwargs)
        uncond_out, cond_out = out.chunk(2)
        return uncond_out + self.scale * (cond_out - uncond_out), uncond_out

    def __call__(self, x: Tensor, sigma: Tensor, *, cond: Any = None, uncond: Any = None, **kwargs) -> Tensor:
        sigma = model_sigma(sigma, x)
        self._require(cond, uncond)
        if self.scale == 1:
            return self.model(x, sigma, **self._kwargs(cond, "cond"), **kwargs)
        if self.scale == 0:
            return self.model(x, sigma, **self._kwargs(uncond, "uncond"), **kwargs)
        return self._both(x, sigma, cond, uncond, kwargs)[0]

    def guided_and_uncond(self, x: Tensor, sigma: Tensor, *, cond: Any = None, uncond: Any = None,
                          **kwargs) -> tuple[Tensor, Tensor]:
        """``(D_w, D_u)`` from one batched call, for the CFG++ samplers."""
        self._require(cond, uncond, both=True)
        return self._both(x, model_sigma(sigma, x), cond, uncond, kwargs)
