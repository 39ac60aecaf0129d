"""scikit-learn's bundled 8x8 digits (no download) as a 64-dimensional diffusion data set."""
from __future__ import annotations

import torch
from torch import Tensor

#: the null class label: the teacher's and students' unconditional branch
NULL_CLASS = 10
N_CLASSES = 10
DIM = 64


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``(x, labels)``: ``x`` in ``[-1, 1]``, shape ``[1797, 64]``; labels ``0..9``.

    Needs scikit-learn (``pip install 'kdpp[learned]'``); the data ship with it.
    """
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("kdpp.learned needs scikit-learn: pip install 'kdpp[learned]'") from e
    bunch = sk_load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float64) / 8.0 - 1.0  # pixel values 0..16
    return x.to(dtype), torch.as_tensor(bunch.target, dtype=torch.long)


def split(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A seeded random ``(train, test)`` split of ``range(n)`` (index tensors)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = round(n * test_fraction)
    return perm[n_test:], perm[:n_test]


def to_images(x: Tensor) -> Tensor:
    """Samples ``[B, 64]`` in ``[-1, 1]`` as images ``[B, 8, 8]`` in ``[0, 1]`` (clipped)."""
    return ((x.float().reshape(-1, 8, 8) + 1) / 2).clamp(0, 1)
