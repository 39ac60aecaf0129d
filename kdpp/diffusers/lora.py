"""LoRA students on the teacher's own weights: one diffusers model, two denoisers.

A LoRA student (LCM-LoRA, SDXL-Lightning LoRA, step-distilled FLUX and Wan LoRAs) is its teacher
plus low-rank adapters, so the pair needs one model in memory, not two. :class:`SharedLoRAModel`
wraps one diffusers model carrying PEFT adapters (loaded with diffusers' LoRA loaders,
``load_lora_adapter`` or ``add_adapter``) as two callables: :attr:`~SharedLoRAModel.student` calls
it with the student's adapters, :attr:`~SharedLoRAModel.teacher` with every adapter disabled. Any
family's ``generate`` takes the two (``generate(pair.student, pair.teacher, ...)``).

**Never a wrong model silently.** The adapters are read from the model at the start of every run
(each :meth:`~SharedLoRAModel.session`; a call outside one is a session of its own), so adapters
loaded or deleted after the pair was built are followed: the teacher disables every PEFT layer the
model has then, the student is the model's active adapters at their scales then (or the
``adapter_names`` / ``adapter_weights`` given at construction). What cannot be followed is refused
with an error naming the fix: ``adapter_names`` no longer loaded, no adapter active, adapters
disabled on the model, a LoRA fused into the weights.

**Cheap switching.** Within a session the model is put in a role only when the role changes
(student to teacher and back: one flag written per PEFT layer); the model's own adapter state is
restored when the session ends, also when a call raises. Nothing is copied, merged or re-allocated.

Imports peft only when a :class:`SharedLoRAModel` is built.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterator, Sequence

import torch

#: one tuner layer's adapter state: (active adapter(s), adapters disabled, scaling per adapter)
LayerState = tuple[Any, bool, dict[str, float]]


_set = object.__setattr__


def _copy_active(active: Any) -> Any:
    return list(active) if isinstance(active, list) else active


class _Session:
    """One run: the layers, the model's own state to restore, the student's state, and the role the model is in."""

    def __init__(self, layers: list, flags: list[bool], user: list[LayerState] | None,
                 student: list[LayerState] | None):
        self.layers, self.flags, self.user, self.student = layers, flags, user, student
        self.role: str | None = None


class SharedLoRAModel:
    """One model with PEFT LoRA adapters as a student (adapters on) and a teacher (adapters off).

    Args:
        model: a ``torch.nn.Module`` with PEFT adapters (a diffusers ``UNet2DConditionModel``,
            ``FluxTransformer2DModel``, ``WanTransformer3DModel``, ... after
            ``load_lora_adapter``/``add_adapter``, or a pipeline's ``unet``/``transformer`` after
            ``pipe.load_lora_weights``). The LoRA must not be fused into the weights (the teacher
            needs the base weights).
        adapter_names: the student's adapter(s); default: the adapters active on the model when a
            run starts, at their scales (``pipe.set_adapters(...)`` changes them between runs).
        adapter_weights: their scales (a float or one per adapter, as diffusers' ``set_adapters``
            takes them; with ``adapter_names`` only: scale 1). Given either, the student is what
            ``model.set_adapters(adapter_names, adapter_weights)`` sets (names default to the active
            ones), whatever the model's own state; the model itself is left as it was.

    ``student`` and ``teacher`` are callables with the model's signature (attributes such as
    ``config``, ``dtype`` and ``parameters`` read through to the model), so they drop in wherever a
    model is expected, e.g. any family's ``generate``. Wrap a run of your own in
    ``with pair.session():`` to switch adapters only when the role changes.
    """

    def __init__(self, model: torch.nn.Module, adapter_names: str | Sequence[str] | None = None,
                 adapter_weights: float | Sequence[float] | None = None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module with PEFT adapters, got {type(model).__name__}")
        self.model = model
        self.adapter_names = None if adapter_names is None else (
            [adapter_names] if isinstance(adapter_names, str) else list(adapter_names))
        if adapter_weights is not None and not isinstance(adapter_weights, numbers.Real):
            adapter_weights = list(adapter_weights)
            if self.adapter_names is not None and len(adapter_weights) != len(self.adapter_names):
                raise ValueError(f"adapter_weights has {len(adapter_weights)} entries for "
                                 f"{len(self.adapter_names)} adapter_names")
        self.adapter_weights = adapter_weights
        self._named = adapter_names is not None or adapter_weights is not None
        self._scan: tuple | None = None  # (the fingerprint it was read at, the layers, where each layer sits)
        self._named_cache: tuple | None = None  # ((fingerprint, adapter names), the named student's state)
        self._session: _Session | None = None
        self._prepare()  # refuses now what a run would refuse
        self.student = AdapterView(self, "student")
        self.teacher = AdapterView(self, "teacher")

    def _loaded(self) -> tuple[str, ...] | None:
        """The adapters loaded on the model (diffusers models keep them in ``peft_config``); ``None`` if it keeps none."""
        config = getattr(self.model, "peft_config", None)
        return tuple(config) if isinstance(config, dict) else None

    def _fingerprint(self) -> tuple | None:
        """The loaded adapters and their config objects; ``None`` for a model that keeps no ``peft_config``."""
        config = getattr(self.model, "peft_config", None)
        return tuple((name, id(value)) for name, value in config.items()) if isinstance(config, dict) else None

    def layers(self) -> list:
        """The model's PEFT tuner layers now (adapters loaded after the pair was built included).

        Read again whenever the model's loaded adapters (``peft_config``: names and config objects)
        changed since the last read or a layer read then is no longer in the model, and on every
        call for a model that keeps no ``peft_config``.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        fingerprint = self._fingerprint()
        if self._scan is not None and fingerprint is not None and self._scan[0] == fingerprint and all(
                children.get(name) is layer for children, name, layer in self._scan[2]):
            return self._scan[1]
        places = [(parent, name, child) for parent in self.model.modules()
                  for name, child in parent._modules.items() if isinstance(child, BaseTunerLayer)]
        layers = [child for _, _, child in places]
        if isinstance(self.model, BaseTunerLayer):
            layers.insert(0, self.model)
        if not layers:
            raise ValueError(f"model ({type(self.model).__name__}) has no PEFT adapter layers: load a LoRA first "
                             "(pipe.load_lora_weights, model.load_lora_adapter or model.add_adapter)")
        for layer in layers:
            if not all(hasattr(layer, a) for a in ("_active_adapter", "_disable_adapters")):
                raise TypeError(f"{type(layer).__name__} has no _active_adapter/_disable_adapters: unsupported peft version")
        self._scan = (fingerprint, layers, [(parent._modules, name, child) for parent, name, child in places])
        return layers

    @staticmethod
    def _state(layers: list) -> list[LayerState]:
        return [(_copy_active(layer._active_adapter), bool(layer._disable_adapters), dict(getattr(layer, "scaling", {})))
                for layer in layers]

    # The adapter state is plain attributes of the layers: written with object.__setattr__, which is what
    # torch.nn.Module.__setattr__ ends in for them, without its type checks (7 us a write on 2 cores).

    @staticmethod
    def _apply(layers: list, state: list[LayerState]) -> None:
        for layer, (active, disabled, scaling) in zip(layers, state):
            _set(layer, "_active_adapter", _copy_active(active))
            _set(layer, "_disable_adapters", disabled)
            if scaling:
                layer.scaling.update(scaling)

    @staticmethod
    def _set_flags(layers: list, disabled: bool | list[bool]) -> None:
        if isinstance(disabled, bool):
            for layer in layers:
                _set(layer, "_disable_adapters", disabled)
        else:
            for layer, flag in zip(layers, disabled):
                _set(layer, "_disable_adapters", flag)

    def _prepare(self) -> _Session:
        """Read the model's layers and adapter state now; refuse what cannot be followed."""
        layers = self.layers()
        if any(layer.merged for layer in layers):
            raise ValueError("model's LoRA is fused into its weights (fuse_lora/merge_adapter): the teacher needs "
                             "the base weights; unfuse it (unfuse_lora) or load the LoRA without fusing")
        flags = [bool(layer._disable_adapters) for layer in layers]
        if self._named:
            user = self._state(layers)
            student = self._named_state(layers, user)
            actives = [active for active, _, _ in student]
        else:
            if all(flags):
                raise ValueError("the model's adapters are disabled (model.disable_adapters()): the student would be the "
                                 "base model; call model.enable_adapters(), or pass adapter_names to SharedLoRAModel")
            user = student = None
            actives = [layer._active_adapter for layer in layers]
        active = {name for a in actives for name in ([a] if isinstance(a, str) else a)}
        loaded = set(self._loaded() or ())
        if not active or (loaded and not active & loaded):
            raise ValueError(f"no adapter is active on the model (it has {sorted(loaded)}): the student would be the "
                             "base model; activate the student's adapters (pipe.set_adapters / model.set_adapters) or "
                             "pass adapter_names to SharedLoRAModel")
        return _Session(layers, flags, user, student)

    def _named_state(self, layers: list, user: list[LayerState]) -> list[LayerState]:
        """What diffusers' ``model.set_adapters(adapter_names, adapter_weights)`` sets, read back; the model restored."""
        if not callable(getattr(self.model, "set_adapters", None)):
            raise TypeError(f"adapter_names/adapter_weights need a diffusers model (set_adapters); "
                            f"{type(self.model).__name__} has none: activate the student's adapters on it and build "
                            "the pair without them")
        names = self.adapter_names
        if names is None:
            names = sorted({n for a, _, _ in user for n in ([a] if isinstance(a, str) else a)})
        known = set(self._loaded() or ())
        if any(n not in known for n in names):
            raise ValueError(f"adapter_names {[n for n in names if n not in known]} are not loaded on the model "
                             f"(it has {sorted(known)}; deleted after the pair was built?): load them again, or build "
                             "the SharedLoRAModel with the adapters the student should use")
        weights = self.adapter_weights
        if isinstance(weights, list) and len(weights) != len(names):
            raise ValueError(f"adapter_weights has {len(weights)} entries for {len(names)} adapter_names")
        key = (self._scan[0], tuple(names))
        if self._named_cache is not None and self._named_cache[0] == key and key[0] is not None:
            return self._named_cache[1]
        grads = {p: p.requires_grad for p in self.model.parameters()}
        try:
            self.model.set_adapters(names, weights)
            student = [(active, False, scaling) for active, _, scaling in self._state(layers)]
            self._named_cache = (key, student)
            return student
        finally:
            self._apply(layers, user)
            for p, flag in grads.items():
                p.requires_grad_(flag)

    @contextlib.contextmanager
    def session(self) -> Iterator["SharedLoRAModel"]:
        """One run: the adapters read from the model now, roles switched only when they change, the model restored after.

        Re-entrant (an inner session is the outer one). Every family's ``generate`` (the body,
        :func:`kdpp.diffusers.sampling.sample`) runs inside one.
        """
        if self._session is not None:
            yield self
            return
        self._session = self._prepare()
        try:
            yield self
        finally:
            session, self._session = self._session, None
            if session.user is not None:
                self._apply(session.layers, session.user)
            else:
                self._set_flags(session.layers, session.flags)

    def _enter(self, role: str) -> None:
        """Put the model in ``role``: the student's adapters on (named ones: their state), or every layer disabled."""
        session = self._session
        if session.role == role:
            return
        if session.role is None and session.student is not None:
            self._apply(session.layers, session.student)
        self._set_flags(session.layers, role == "teacher")
        session.role = role

    def call(self, role: str, *args: Any, **kwargs: Any) -> Any:
        """Call the model as ``role`` (``"student"`` or ``"teacher"``)."""
        if self._session is None:
            with self.session():
                return self.call(role, *args, **kwargs)
        self._enter(role)
        return self.model(*args, **kwargs)


class AdapterView:
    """The shared model seen in one role: call it like the model."""

    def __init__(self, pair: SharedLoRAModel, role: str):
        self.pair, self.role = pair, role

    def __call__(self, *args, **kwargs) -> Any:
        return self.pair.call(self.role, *args, **kwargs)

    def __getattr__(self, attr: str) -> Any:  # config, dtype, device, parameters, cache_context, ... of the model
        if attr.startswith("__") or attr in ("pair", "role"):  # dunders, and our own before __init__ ran (copy)
            raise AttributeError(attr)
        return getattr(self.pair.model, attr)

    def __repr__(self) -> str:
        return f"AdapterView({self.role} of {type(self.pair.model).__name__})"
