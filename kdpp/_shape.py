"""One tiny shape helper shared by the model wrappers."""
from __future__ import annotations

from torch import Tensor


def per_sample(v: Tensor, x: Tensor) -> Tensor:
    """A ``[batch]`` tensor reshaped to broadcast against ``x`` (``[batch, 1, ..., 1]``) in ``x``'s dtype."""
    return v.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
