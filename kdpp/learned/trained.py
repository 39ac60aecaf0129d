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
from kdpp.noise import initial_noise
from kdpp.schedules import karras_sigmas, timestep_sigmas, trailing_timesteps

from .data import NULL_CLASS
from .nets import DigitsClassifier, EDMDenoiser, check_labels

WEIGHTS = Path(__file__).with_name("digits_nets.pt")
PROVENANCE = Path(__file__).with_name("provenance.json")
#: the teacher's classifier-free guidance scale in the conditional benchmark
TEACHER_CFG = 4.0
#: the distilled students: architecture, the CFG scale ``w`` of the teacher they were distilled from,
#: their initialisation (``None``: random; ``"teacher"``: the teacher's weights) and what they stand for
STUDENTS: dict[str, dict[str, Any]] = {
    "strong": {"hidden": 256, "blocks": 3, "w": 4.0, "init": None,
               "role": "converged student, half the teacher's width, trained from scratch"},
    "teacher_init": {"hidden": 384, "blocks": 3, "w": 4.0, "init": "teacher",
                     "role": "converged student initialised from the teacher's weights (as LCM / DMD2 students are)"},
    "small": {"hidden": 48, "blocks": 1, "w": 4.0, "init": None,
              "role": "capacity-limited on purpose (16 k parameters): weak, grainy samples"},
    "weakcfg": {"hidden": 256, "blocks": 3, "w": 0.3, "init": None,
                "role": "converged, but distilled at CFG w = 0.3: weak class alignment (the paper's case)"},
}
SIGMA_MAX = 80.0


def load_nets(path: str | Path = WEIGHTS, dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Module]:
    """``{"teacher", "classifier", *STUDENTS}``: the nets in eval mode, in ``dtype`` (the oracle student,
    which has no weights, is :class:`TeacherODEStudent`)."""
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


def conditioning(labels: Tensor | None) -> tuple[dict[str, Any], dict[str, Any]]:
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
                   seed: int = 0, n: int | None = None, schedule: str = "karras") -> Tensor:
    """The teacher alone: ``steps`` DPM++ 2M steps, CFG ``w``, on ``karras_sigmas(steps, 0.002, 80)``
    (``schedule="karras"``) or on the students' LCM schedule ``timestep_sigmas(trailing_timesteps(steps))``
    (``schedule="trailing"``, sigma 14.6 -> 0), from noise drawn by a CPU generator seeded ``seed``.

    ``labels=None`` samples ``n`` unconditional digits (``n`` is then required).
    """
    if schedule not in ("karras", "trailing"):
        raise ValueError(f"schedule must be 'karras' or 'trailing', got {schedule!r}")
    if labels is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample_teacher(teacher, labels=None) samples n unconditional digits: n must be an "
                             f"int >= 1, got {n!r}")
    else:
        check_labels(labels, "labels", None, allow_null=True)
        if n is not None and n != len(labels):
            raise ValueError(f"n must be None or len(labels) ({len(labels)}) when labels are given, got {n!r}")
        n = len(labels)
    sigmas = (karras_sigmas(steps, 0.002, SIGMA_MAX) if schedule == "karras"
              else timestep_sigmas(trailing_timesteps(steps)))
    x = initial_noise(seed, (n, 64)) * sigmas[0].item()
    _, targs = conditioning(labels)
    return kdpp.sample_dpmpp_2m_distpp(guided_teacher(teacher, labels, w), None, x, sigmas, 0.0, 0,
                                       extra_args=targs, disable=True)


class CountedNet:
    """A denoiser that counts its calls and its network evaluations per sample of a run of ``n`` samples: one
    call on a batch of ``n`` counts 1 evaluation, a batched CFG call (``[uncond, cond]``, ``2 n`` rows) 2."""

    def __init__(self, net, n: int):
        self.net, self.n, self.evals, self.calls = net, n, 0.0, 0

    def __call__(self, x: Tensor, sigma: Tensor, **kwargs) -> Tensor:
        self.evals += x.shape[0] / self.n
        self.calls += 1
        return self.net(x, sigma, **kwargs)


class TeacherODEStudent:
    r"""The oracle student: ``S(x, sigma)`` = the teacher's own probability-flow ODE endpoint from ``(x, sigma)``.

    What a perfectly distilled endpoint student would return, with no training: ``steps`` DPM++ 2M steps of
    the teacher (CFG ``w`` when ``class_labels`` are given) on ``karras_sigmas(steps, sigma_min, sigma)``,
    down to 0. Each call costs ``steps`` teacher evaluations (``2 * steps`` with CFG): a reference, not a
    fast sampler. Called like the students, ``S(x, sigma, class_labels=None)``; ``sigma`` is a number or a
    ``[B]`` tensor (items at different levels are integrated separately).
    """

    def __init__(self, teacher: torch.nn.Module, w: float = TEACHER_CFG, steps: int = 24, sigma_min: float = 0.002):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.teacher, self.w, self.steps, self.sigma_min = teacher, w, steps, sigma_min

    @torch.no_grad()
    def __call__(self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None = None) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1).expand(x.shape[0])
        if class_labels is not None:
            check_labels(class_labels, "class_labels", x.shape[0], allow_null=True)
        out = torch.empty_like(x)
        for level in s.unique().tolist():
            rows = (s == level).nonzero().reshape(-1)
            labels = None if class_labels is None else class_labels[rows]
            model = guided_teacher(self.teacher, labels, self.w)
            _, targs = conditioning(labels)
            if level <= self.sigma_min:
                out[rows] = model(x[rows], torch.full((len(rows),), level, dtype=x.dtype), **targs)
                continue
            sigmas = karras_sigmas(self.steps, self.sigma_min, level)
            out[rows] = kdpp.sample_dpmpp_2m_distpp(model, None, x[rows], sigmas, 0.0, 0, extra_args=targs,
                                                    disable=True)
        return out


def sample_student(student, labels: Tensor | None, steps: int, seed: int = 0, n: int | None = None,
                   teacher: torch.nn.Module | None = None, w: float = TEACHER_CFG, **distpp) -> Tensor:
    """A student alone (or with its teacher calls, ``distpp``: ``lam``, ``k`` / ``guided_steps``, ``renoise``, ...):
    ``steps`` multistep consistency steps (``kdpp.sample_lcm_distpp``) on the LCM trailing schedule
    ``timestep_sigmas(trailing_timesteps(steps))`` (sigma 14.6 -> 0), from seeded noise.

    ``labels=None`` samples ``n`` unconditional digits. ``seed`` draws everything: the initial noise
    (:func:`kdpp.noise.initial_noise`), the solver and the renoise noise (the sampler's streams), so runs of
    one seed with and without teacher calls are paired.
    """
    if labels is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample_student(student, labels=None) samples n unconditional digits: n must be an "
                             f"int >= 1, got {n!r}")
    else:
        check_labels(labels, "labels", None, allow_null=True)
        n = len(labels)
    sigmas = timestep_sigmas(trailing_timesteps(steps))
    x = initial_noise(seed, (n, 64)) * sigmas[0].item()
    sargs, targs = conditioning(labels)
    if not distpp:
        distpp = {"lam": 0.0, "k": 0}
    return kdpp.sample_lcm_distpp(student, None if teacher is None else guided_teacher(teacher, labels, w), x, sigmas,
                                  extra_args=sargs, teacher_extra_args=targs, disable=True, seed=seed, **distpp)
