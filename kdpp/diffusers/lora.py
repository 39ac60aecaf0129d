"""LoRA students on the teacher's own weights: one diffusers model, two denoisers.

A LoRA student (LCM-LoRA, SDXL-Lightning LoRA, step-distilled FLUX LoRAs) is its teacher plus
low-rank adapters, so the pair needs one model in memory, not two. :class:`SharedLoRAModel` wraps
one diffusers model carrying PEFT adapters (loaded with diffusers' LoRA loaders,
``load_lora_adapter`` or ``add_adapter``) as two callables: :attr:`~SharedLoRAModel.student`
calls it with the student's adapters active at their scales, :attr:`~SharedLoRAModel.teacher`
with every adapter disabled. Around each call the adapter state of every PEFT layer (active
adapters, enabled flag, scales) is set for that role and restored afterwards, also when the call
raises. Nothing is copied or fused; any ``torch.nn.Module`` whose adapters are PEFT tuner layers
works (UNets, FLUX/SD3 transformers).

Imports peft only when a :class:`SharedLoRAModel` is built.
"""
from __future__ import annotations

import numbers
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .presets import StudentPreset, TeacherPreset
from .sdxl import SDXLConditioning, generate, vp_denoisers

#: one tuner layer's adapter state: (active adapter(s), adapters disabled, scaling per adapter)
LayerState = tuple[Any, bool, dict[str, float]]


def _copy_active(active: Any) -> Any:
    return list(active) if isinstance(active, list) else active


class SharedLoRAModel:
    """One model with PEFT LoRA adapters as a student (adapters on) and a teacher (adapters off).

    Args:
        model: a ``torch.nn.Module`` with PEFT adapters (a diffusers ``UNet2DConditionModel``,
            ``FluxTransformer2DModel``, ... after ``load_lora_adapter``/``add_adapter``, or a
            pipeline's ``unet``/``transformer`` after ``pipe.load_lora_weights``). The LoRA must not
            be fused into the weights (the teacher needs the base weights).
        adapter_names: the student's adapter(s); default: the adapters active now.
        adapter_weights: their scales (a float or one per adapter, as diffusers' ``set_adapters``
            takes them). With neither given, the student uses the adapters and scales set now;
            given either, what ``model.set_adapters(adapter_names, adapter_weights)`` sets (scale
            1 by default). Either way the model itself is left as it was.

    ``student`` and ``teacher`` are callables with the model's signature (attributes such as
    ``config``, ``dtype`` and ``parameters`` read through to the model), so they drop in wherever a
    model is expected, e.g. :func:`kdpp.diffusers.sdxl.generate`.
    """

    def __init__(self, model: torch.nn.Module, adapter_names: str | Sequence[str] | None = None,
                 adapter_weights: float | Sequence[float] | None = None):
        from peft.tuners.tuners_utils import BaseTunerLayer

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module with PEFT adapters, got {type(model).__name__}")
        self.model = model
        self.layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
        if not self.layers:
            raise ValueError(f"model ({type(model).__name__}) has no PEFT adapter layers: load a LoRA first "
                             "(pipe.load_lora_weights, model.load_lora_adapter or model.add_adapter)")
        for layer in self.layers:
            if not all(hasattr(layer, a) for a in ("_active_adapter", "_disable_adapters")):
                raise TypeError(f"{type(layer).__name__} has no _active_adapter/_disable_adapters: unsupported peft version")
            if layer.merged:
                raise ValueError("model's LoRA is fused into its weights (fuse_lora/merge_adapter): the teacher needs "
                                 "the base weights; unfuse it (unfuse_lora) or load the LoRA without fusing")
        before = self.state()
        grads = {p: p.requires_grad for p in model.parameters()}
        try:
            if adapter_names is not None or adapter_weights is not None:
                self._set_adapters(adapter_names, adapter_weights)
            student = self.state()
        finally:
            self._apply(before)
            for p, flag in grads.items():
                p.requires_grad_(flag)
        if not any(active for active, _, _ in student):
            raise ValueError("no adapter is active on the model: pass adapter_names (see model.peft_config)")
        self._student_state = [(active, False, scaling) for active, _, scaling in student]
        self._teacher_state = [(active, True, scaling) for active, _, scaling in student]
        self.student = AdapterView(self, self._student_state, "student")
        self.teacher = AdapterView(self, self._teacher_state, "teacher")

    def _set_adapters(self, names: str | Sequence[str] | None, weights: float | Sequence[float] | None) -> None:
        """What diffusers' ``model.set_adapters(names, weights)`` sets (names default to the active ones)."""
        if not callable(getattr(self.model, "set_adapters", None)):
            raise TypeError(f"adapter_names/adapter_weights need a diffusers model (set_adapters); {type(self.model).__name__} "
                            "has none: activate the student's adapters on it before building the pair")
        names = self.layers[0].active_adapters if names is None else [names] if isinstance(names, str) else list(names)
        known = set(self.model.peft_config)
        if any(n not in known for n in names):
            raise ValueError(f"adapter_names {[n for n in names if n not in known]} are not loaded on the model "
                             f"(it has {sorted(known)})")
        if weights is not None and not isinstance(weights, numbers.Real):
            weights = list(weights)
            if len(weights) != len(names):
                raise ValueError(f"adapter_weights has {len(weights)} entries for {len(names)} adapter_names")
        self.model.set_adapters(names, weights)

    def state(self) -> list[LayerState]:
        """Every tuner layer's ``(active adapter(s), disabled, scaling)``, a copy."""
        return [(_copy_active(layer._active_adapter), bool(layer._disable_adapters), dict(getattr(layer, "scaling", {})))
                for layer in self.layers]

    def _apply(self, state: list[LayerState]) -> None:
        for layer, (active, disabled, scaling) in zip(self.layers, state):
            layer._active_adapter = _copy_active(active)
            layer._disable_adapters = disabled
            if scaling:
                layer.scaling.update(scaling)

    @contextmanager
    def role(self, state: list[LayerState]) -> Iterator[None]:
        """Put the model in ``state`` for the ``with`` body, then back in the state it had."""
        before = self.state()
        self._apply(state)
        try:
            yield
        finally:
            self._apply(before)


class AdapterView:
    """The shared model seen in one adapter state: call it like the model."""

    def __init__(self, owner: SharedLoRAModel, state: list[LayerState], name: str):
        self._owner, self._state, self.name = owner, state, name

    def __call__(self, *args, **kwargs) -> Any:
        with self._owner.role(self._state):
            return self._owner.model(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:  # config, dtype, device, parameters, ... of the model
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(self._owner.model, attr)

    def __repr__(self) -> str:
        return f"AdapterView({self.name} of {type(self._owner.model).__name__})"


def lora_vp_denoisers(
    unet: torch.nn.Module, preset: StudentPreset, teacher: TeacherPreset = TeacherPreset(), *,
    adapter_names: str | Sequence[str] | None = None, adapter_weights: float | Sequence[float] | None = None,
    alphas_cumprod: Tensor | None = None, student_guidance: float | None = None,
) -> tuple[Any, Any]:
    """The student and teacher VE denoisers of one LoRA-carrying UNet, for any kdpp sampler.

    The student is the UNet with its adapters (``preset``'s parametrization, e.g. LCM's
    boundary condition); the teacher the same UNet with adapters off, with CFG at
    ``teacher.cfg_scale`` (:func:`kdpp.diffusers.sdxl.vp_denoisers`). ``student_guidance`` is
    ``generate``'s: the guidance-scale embedding input of a UNet with ``time_cond_proj_dim``
    (default 5.0 as the pipeline), an error for one without (SDXL base, LCM-LoRA's).
    """
    shared = SharedLoRAModel(unet, adapter_names, adapter_weights)
    return vp_denoisers(shared.student, shared.teacher, preset, teacher, alphas_cumprod, student_guidance)


def generate_sdxl(
    unet: torch.nn.Module, conditioning: SDXLConditioning, preset: StudentPreset, *,
    adapter_names: str | Sequence[str] | None = None, adapter_weights: float | Sequence[float] | None = None,
    **kwargs: Any,
) -> Any:
    """:func:`kdpp.diffusers.sdxl.generate` with a LoRA student and its base as the teacher, from one UNet.

    ``unet`` is SDXL base carrying the student's LoRA (e.g. ``pipe.unet`` after
    ``pipe.load_lora_weights(...)``, not fused); the other keyword arguments are ``generate``'s.
    """
    shared = SharedLoRAModel(unet, adapter_names, adapter_weights)
    return generate(shared.student, shared.teacher, conditioning, preset, **kwargs)
