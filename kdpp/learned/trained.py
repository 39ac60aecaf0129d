"""The shipped nets (fp16, trained by ``benchmarks/train_learned.py``) and how to sample them.

``provenance.json`` beside the weights records the script, seed, git revision, torch version,
threads, wall time per stage and the accuracies measured right after training.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import kdpp
from kdpp.schedules import karras_sigmas

from .data import NULL_CLASS
from .nets import DigitsClassifier, EDMDenoiser, check_labels

WEIGHTS = Path(__file__).with_name("digits_nets.pt")
PROVENANCE = Path(__file__).with_name("provenance.json")
#: the teacher's classifier-free guidance scale in the conditional benchmark
TEACHER_CFG = 4.0
#: the distilled students: architecture and the CFG scale ``w`` of the teacher they were distilled from
STUDENTS: dict[str, dict[str, Any]] = {
    "strong": {"hidden": 256, "blocks": 3, "w": 4.0},
    "small": {"hidden": 48, "blocks": 1, "w": 4.0},
    "weakcfg": {"hidden": 256, "blocks": 3, "w": 0.3},
}
SIGMA_MAX = 80.0


def load_nets(path: str | Path = WEIGHTS, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """``{"teacher", "strong", "small", "weakcfg", "classifier"}``: the nets in eval mode, in ``dtype``."""
    blobs = torch.load(path, map_location="cpu", weights_only=True)
    nets = {}
    for name, blob in blobs.items():
        net = (DigitsClassifier if name == "classifier" else EDMDenoiser)(**blob["config"])
        net.load_state_dict({k: v.to(dtype) for k, v in blob["state_dict"].items()})
        nets[name] = net.to(dtype).eval().requires_grad_(False)
    return nets


def provenance(path: str | Path = PROVENANCE) -> dict[str, Any]:
    """The training record shipped with the weights."""
    return json.loads(Path(path).read_text())


def conditioning(labels: Tensor | None, w: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(student extra_args, teacher extra_args)`` for requested ``labels`` (``None``: unconditional).

    The teacher is meant to be wrapped as ``kdpp.CFGDenoiser(teacher, w, cond_key="class_labels")``
    when ``labels`` is given and used bare otherwise.
    """
    if labels is None:
        return {}, {}
    return {"class_labels": labels}, {"cond": labels, "uncond": torch.full_like(labels, NULL_CLASS)}


def guided_teacher(teacher: torch.nn.Module, labels: Tensor | None, w: float = TEACHER_CFG):
    """The teacher as the samplers call it: CFG-wrapped for class-conditional runs, bare otherwise."""
    return teacher if labels is None else kdpp.CFGDenoiser(teacher, scale=w, cond_key="class_labels")


@torch.no_grad()
def sample_teacher(teacher: torch.nn.Module, labels: Tensor | None, steps: int = 40, w: float = TEACHER_CFG,
                   seed: int = 0, n: int | None = None) -> Tensor:
    """The teacher alone: ``steps`` DPM++ 2M steps on ``karras_sigmas(steps, 0.002, 80)``, CFG ``w``.

    ``labels=None`` samples ``n`` unconditional digits (``n`` is then required).
    """
    if labels is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample_teacher(teacher, labels=None) samples n unconditional digits: n must be an "
                             f"int >= 1, got {n!r}")
    else:
        check_labels(labels, "labels", None, allow_null=True)
        if n is not None and n != len(labels):
            raise ValueError(f"n must be None or len(labels) ({len(labels)}) when labels are given, got {n!r}")
        n = len(labels)
    sigmas = karras_sigmas(steps, 0.002, SIGMA_MAX)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed)) * SIGMA_MAX
    _, targs = conditioning(labels, w)
    return kdpp.sample_dpmpp_2m_distpp(guided_teacher(teacher, labels, w), None, x, sigmas, 0.0, 0,
                                       extra_args=targs, disable=True)
