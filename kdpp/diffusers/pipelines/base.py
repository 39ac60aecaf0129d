"""What the Distillation++ pipelines share: construction from a pipeline, the teacher, the run, the output.

A pipeline (:class:`DistPPPipelineMixin` on top of a diffusers pipeline class) holds the student
(the pipeline's own ``transformer`` / ``unet``), a teacher, and the student's preset; its
``__call__`` does what the diffusers pipeline does around the denoising loop with the pipeline's
own helpers (``check_inputs``, ``encode_prompt``, ``prepare_latents``, the VAE,
``image_processor`` / ``video_processor``), and hands the loop to the one generation body,
:func:`kdpp.diffusers.sampling.sample`, through :meth:`DistPPPipelineMixin._sample`.

**Noise.** The initial latents are the pipeline's own ``prepare_latents`` draw for the given
``generator`` (or ``latents``). Where the pipeline's scheduler draws noise in its step
(ancestral and consistency samplers: ``EulerAncestralDiscreteScheduler``, ``LCMScheduler``,
``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``), the kdpp sampler gets the same
draws in the same order: from ``generator`` where the pipeline passes it to ``scheduler.step``
(``StableDiffusionXLPipeline``), from torch's global RNG where it does not (the flow pipelines).
So ``lam = 0`` is the diffusers pipeline with the preset's scheduler. The teacher's renoising
noise comes from kdpp seeds derived from the generators' states (read, never advanced; the global
RNG's state without a generator): the same generator state gives the same images.

**The teacher** is one of: another pipeline (its ``transformer`` / ``unet`` is used), a denoiser
model, or a :class:`kdpp.diffusers.lora.SharedLoRAModel` of the pipeline's own model (a LoRA
student: the teacher is the same weights with the adapters off, one model in memory). A separate
teacher model is a pipeline component (``teacher_transformer`` / ``teacher_unet``), so
``enable_model_cpu_offload``, group offloading and ``to()`` handle it like the others; it is called
through :class:`TeacherCall`: on its own device (inputs moved there, outputs back), and, under
``enable_model_cpu_offload``, with the student moved off the accelerator before its call and
itself after it, so that one denoiser's weights are on the accelerator at a time.
"""
from __future__ import annotations

import dataclasses
import hashlib
import numbers
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from ...noise import derived_seed, stream_seed
from ...refine import calls_teacher
from .. import sampling
from ..lora import SharedLoRAModel
from ..sampling import Family

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

#: why a pipeline refuses ``sigmas``/``mu`` and the IP-Adapter arguments (the messages name the argument)
WHY_SCHEDULE = ("the schedule is the student preset's (num_inference_steps sets its step count; pass a preset to "
                "from_pipe(student=...) for another)")
WHY_IP = "IP-Adapter image embeddings are not passed to the student and teacher"


def generator_state_seed(generator: torch.Generator) -> int:
    """A seed derived from (without advancing) ``generator``'s state: the same state gives the same seed."""
    state = generator.get_state()
    digest = hashlib.blake2b(state.cpu().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def generator_seeds(generator: Any, batch: int, device: torch.device) -> list[int]:
    """One kdpp seed per image from diffusers' ``generator`` argument: its state now, read without drawing.

    (The pipelines call it after ``prepare_latents`` drew the initial latents, so the seeds are
    those of the generators' state after that draw: a function of the state they were given in.)
    A list of generators (one per image, as diffusers takes them) gives each image its generator's
    seed, so an image does not depend on its batch; one generator, or ``None`` (torch's global RNG on
    ``device``, which diffusers then draws from), gives a base seed for the first image and
    ``stream_seed(base, b)`` for image ``b > 0`` (a list of one generator is that generator, as in diffusers).
    """
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got a list of "
                            f"{sorted({type(g).__name__ for g in generator})}")
        if len(generator) == batch:
            return [generator_state_seed(g) for g in generator]
        if len(generator) != 1:
            raise ValueError(f"generator has {len(generator)} generators for an effective batch of {batch} images "
                             "(prompts x num_images_per_prompt): pass one generator, or one per image")
        generator = generator[0]
    if generator is None:
        base = derived_seed(torch.device(device))
    elif isinstance(generator, torch.Generator):
        base = generator_state_seed(generator)
    else:
        raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
    return [base] + [stream_seed(base, b) for b in range(1, batch)]


def _move(value: Any, device: torch.device) -> Any:
    """Tensors in ``value`` (nested tuples, lists, dicts, diffusers outputs) on ``device``."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        moved = {k: _move(v, device) for k, v in value.items()}
        return type(value)(**moved) if type(value) is not dict else moved
    return value


def _tensor_device(args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.device | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor):
            return value.device
    return None


class TeacherCall:
    """A separate teacher model called from the student's device, as a pipeline component.

    Each call sends the tensor arguments to the teacher's execution device (its own device; the
    onload device of its offloading hooks) and the outputs back to the device the arguments came
    from. Under ``enable_model_cpu_offload`` (accelerate's hooks in the pipeline's ``_all_hooks``),
    the student is moved off the accelerator before the call and the teacher after it, so the two
    are never on the accelerator together. Attributes (``config``, ``dtype``, ``cache_context``,
    ...) read through to the model.
    """

    def __init__(self, model: torch.nn.Module, student: torch.nn.Module, hooks: Sequence[Any]):
        self.model = model
        self.student_hooks = [h for h in hooks if getattr(h, "model", None) is student]
        self.teacher_hooks = [h for h in hooks if getattr(h, "model", None) is model]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from diffusers.utils.torch_utils import get_module_execution_device

        for hook in self.student_hooks:
            hook.offload()
        home, device = _tensor_device(args, kwargs), get_module_execution_device(self.model)
        moved = home is not None and home != device
        if moved:
            args, kwargs = _move(args, device), _move(kwargs, device)
        try:
            out = self.model(*args, **kwargs)
        finally:
            for hook in self.teacher_hooks:
                hook.offload()
        return _move(out, home) if moved else out

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") or attr in ("model", "student_hooks", "teacher_hooks"):
            raise AttributeError(attr)
        return getattr(self.model, attr)

    def __repr__(self) -> str:
        return f"TeacherCall({type(self.model).__name__})"


class DistPPPipelineMixin:
    """The Distillation++ side of a diffusers pipeline subclass (see the module docstring).

    A pipeline class sets :attr:`_family` (the generation body's family), :attr:`_denoiser` (the
    student component, ``"transformer"`` or ``"unet"``), :attr:`_teacher_component`,
    :attr:`_students` (its preset factories by name) and :attr:`_default_student`, and implements
    ``__call__``, :meth:`_timestep` and, where the pipeline's latents differ from the VE state, :meth:`_frame`
    / :meth:`_unframe` and :meth:`_pack` / :meth:`_unpack`.
    """

    _family: type[Family]
    _denoiser = "transformer"
    _teacher_component = "teacher_transformer"
    _students: Mapping[str, Callable[..., Any]] = {}
    _default_student: str | None = None
    _preset_type: type = object
    _generator_in_step = False  #: whether the diffusers pipeline passes ``generator`` to ``scheduler.step``
    _latents_layout = "[B, C, h, w]"  #: the pipeline's latents, for errors
    _per_prompt = "num_images_per_prompt"
    _model_class = ""  #: the diffusers class of the family's student and teacher (``FluxTransformer2DModel``, ...)
    _family_label = ""  #: the family's name with its article, for errors (``"a FLUX"``, ``"an SD3"``, ...)

    # ------------------------------------------------------------------ the family's models

    @classmethod
    def _of_family(cls, model: Any) -> bool:
        """Whether ``model`` (unwrapped from ``torch.compile``) is an instance of the family's diffusers class."""
        import diffusers

        return isinstance(getattr(model, "_orig_mod", model), getattr(diffusers, cls._model_class))

    @staticmethod
    def _describe(pipeline: Any) -> str:
        """``"FluxPipeline with FluxTransformer2DModel"``: a pipeline's class and its denoiser's (for errors)."""
        for name in ("transformer", "unet"):
            model = getattr(pipeline, name, None)
            if model is not None:
                return f"{type(pipeline).__name__} with {type(getattr(model, '_orig_mod', model)).__name__}"
        return f"{type(pipeline).__name__} without a transformer or unet"

    @classmethod
    def _needs(cls) -> str:
        return f"{cls._family_label} pipeline (a {cls._model_class} {cls._denoiser})"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pipe(cls, pipeline: Any, teacher: Any = None, *, student: Any = None, **components: Any) -> Any:
        """A Distillation++ pipeline sharing ``pipeline``'s components (nothing copied or cast), plus ``teacher``.

        Args:
            pipeline: the user's diffusers pipeline of this family (its ``transformer`` / ``unet`` is the student;
                one of another family is refused, its classes named).
            teacher: another pipeline (its denoiser is the teacher), a denoiser model, a
                :class:`kdpp.diffusers.lora.SharedLoRAModel` of ``pipeline``'s own denoiser (a LoRA
                student: the teacher is the same weights with the adapters off), or ``None`` (only
                runs that never call the teacher: ``lam=0`` or ``k=0``); a model of another family is refused.
            student: the student's preset: a name of the family's presets, a function of the step
                count returning a preset, or a preset; default: the family's default student.
            components: components to use instead of ``pipeline``'s (as diffusers' ``from_pipe``).

        Unlike diffusers' ``from_pipe``, the components keep their dtypes (it casts them to
        ``torch_dtype``, float32 by default, in place).
        """
        from diffusers import DiffusionPipeline

        if not isinstance(pipeline, DiffusionPipeline):
            raise TypeError(f"pipeline must be a diffusers pipeline, got {type(pipeline).__name__}")
        expected, optional = cls._get_signature_keys(cls)
        unknown = sorted(set(components) - set(expected) - {cls._teacher_component})
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pipe got unexpected arguments {unknown} (components are {expected})")
        if cls._teacher_component in components:
            raise TypeError(f"pass the teacher as teacher=..., not {cls._teacher_component}=")
        given = pipeline.components
        kwargs = {name: components.get(name, given.get(name)) for name in expected if name != cls._teacher_component}
        if cls._denoiser in components and not cls._of_family(components[cls._denoiser]):
            raise ValueError(f"{cls._denoiser} must be a {cls._model_class} (the student of {cls._needs()}), got "
                             f"{type(components[cls._denoiser]).__name__}")
        if cls._denoiser not in components and not cls._of_family(kwargs.get(cls._denoiser)):
            raise ValueError(f"{cls.__name__}.from_pipe needs {cls._needs()} as pipeline; got {cls._describe(pipeline)}")
        for name in optional:
            if name in pipeline.config:
                kwargs[name] = pipeline.config[name]
        if "add_watermarker" in optional:  # not a config entry: the pipeline has a watermark or not
            kwargs["add_watermarker"] = getattr(pipeline, "watermark", None) is not None
        new = cls(**kwargs)
        new.set_teacher(teacher)
        new.set_student(student)
        if hasattr(pipeline, "_progress_bar_config"):
            new.set_progress_bar_config(**pipeline._progress_bar_config)
        return new

    def _init_distpp(self) -> None:
        """Called by each pipeline's ``__init__``: no LoRA pair, the default student."""
        self.lora_pair: SharedLoRAModel | None = None
        self.student = None
        self.set_student(None)

    def set_teacher(self, teacher: Any) -> None:
        """Set the teacher (the forms of :meth:`from_pipe`'s ``teacher``); a model becomes the teacher component."""
        from diffusers import DiffusionPipeline

        denoiser = getattr(self, self._denoiser)
        model, pair = None, None
        if isinstance(teacher, SharedLoRAModel):
            if teacher.model is not denoiser:
                raise ValueError(f"teacher is a SharedLoRAModel of another model than the pipeline's {self._denoiser}: "
                                 f"build it from this pipeline's own, SharedLoRAModel(pipe.{self._denoiser})")
            pair = teacher
        elif isinstance(teacher, DiffusionPipeline):
            model = getattr(teacher, self._denoiser, None)
            if not self._of_family(model):
                raise ValueError(f"teacher must be {self._needs()}, a {self._model_class} or a SharedLoRAModel of the "
                                 f"pipeline's {self._denoiser}; got {self._describe(teacher)}")
        elif teacher is not None:
            if not isinstance(teacher, torch.nn.Module):
                raise TypeError(f"teacher must be a diffusers pipeline, a {self._denoiser} model, a SharedLoRAModel or "
                                f"None, got {type(teacher).__name__}")
            if not self._of_family(teacher):
                raise ValueError(f"teacher must be a {self._model_class}, {self._needs()} or a SharedLoRAModel of the "
                                 f"pipeline's {self._denoiser}; got "
                                 f"{type(getattr(teacher, '_orig_mod', teacher)).__name__}")
            model = teacher
        if model is not None and model is denoiser:
            raise ValueError(f"teacher is the pipeline's own {self._denoiser}, so the teacher would be the student; for a "
                             f"LoRA student pass teacher=SharedLoRAModel(pipe.{self._denoiser}) (the same weights with the "
                             "adapters off)")
        self.register_modules(**{self._teacher_component: model})
        self.lora_pair = pair

    def set_student(self, student: Any) -> None:
        """Set the student's preset: a name of :attr:`_students`, a function of the step count, a preset, or ``None`` (the default)."""
        if student is None:
            student = self._default_student
        if student is None:
            self.student = None
            return
        if isinstance(student, str):
            if student not in self._students:
                raise ValueError(f"student must be one of {sorted(self._students)} (or a preset), got {student!r}")
            student = self._students[student]
        elif not (callable(student) or isinstance(student, self._preset_type)):
            raise TypeError(f"student must be a preset name, a function of the step count or a "
                            f"{self._preset_type.__name__}, got {type(student).__name__}")
        self.student = student

    def student_preset(self, num_inference_steps: int | None) -> Any:
        """The student's preset for ``num_inference_steps`` steps (``None``: the preset's own count)."""
        if self.student is None:
            raise ValueError(f"{type(self).__name__} has no student preset: pass student=... to from_pipe "
                             f"(one of {sorted(self._students)}) or call set_student")
        if isinstance(self.student, self._preset_type):
            steps = self._preset_steps(self.student)
            if num_inference_steps is not None and num_inference_steps != steps:
                raise ValueError(f"num_inference_steps={num_inference_steps}, but the student preset "
                                 f"{self.student.name!r} samples {steps} steps (pass a preset name to choose the count)")
            return self.student
        if num_inference_steps is None:
            return self.student()
        try:
            return self.student(num_inference_steps)
        except (TypeError, ValueError) as error:  # the preset's own check of its step count
            raise type(error)(f"num_inference_steps={num_inference_steps!r}: {error}") from error

    @staticmethod
    def _preset_steps(preset: Any) -> int:
        return int(preset.steps)

    # ------------------------------------------------------------------ the models

    def _models(self) -> tuple[Any, Any]:
        """The family's student and teacher models: the LoRA pair's two views, or the denoiser and a :class:`TeacherCall`."""
        denoiser = getattr(self, self._denoiser)
        if self.lora_pair is not None:
            if self.lora_pair.model is not denoiser:
                raise ValueError(f"the pipeline's {self._denoiser} was replaced after the LoRA pair was built: "
                                 f"call set_teacher(SharedLoRAModel(pipe.{self._denoiser})) again")
            return self.lora_pair.student, self.lora_pair.teacher
        teacher = getattr(self, self._teacher_component, None)
        if teacher is None:
            return denoiser, None
        return denoiser, TeacherCall(teacher, denoiser, getattr(self, "_all_hooks", None) or [])

    # ------------------------------------------------------------------ checks

    def _begin(self, output_type: Any, return_dict: Any, num_inference_steps: Any, guided_steps: Any,
               **refused: tuple[Any, Any, str]) -> list[int] | None:
        """The checks every ``__call__`` starts with: each ``refused`` argument (``name=(value, default, why)``)
        must have its default, then ``output_type``, ``return_dict``, ``num_inference_steps``; returns
        ``guided_steps`` read once (an iterator too) and checked as the core checks it."""
        for name, (value, default, why) in refused.items():
            if default is None:
                same = value is None
            elif isinstance(default, numbers.Number):
                same = isinstance(value, numbers.Number) and value == default
            else:
                same = value == default
            if not same:
                raise ValueError(f"{type(self).__name__} does not support {name}: {why}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not isinstance(return_dict, bool):
            raise TypeError(f"return_dict must be True or False, got {return_dict!r}")
        if num_inference_steps is not None and (isinstance(num_inference_steps, bool)
                                                or not isinstance(num_inference_steps, numbers.Integral)):
            raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
        return sampling.guided_step_list(guided_steps)

    def _image_size(self, height: int | None, width: int | None, family: str) -> tuple[int, int]:
        """``height`` and ``width`` (default: the pipeline's), refused unless the VAE downsamples 8x as ``family``'s."""
        if self.vae_scale_factor != 8:
            raise ValueError(f"vae downsamples {self.vae_scale_factor}x; {family}'s VAE (and kdpp's {family} family) 8x")
        return (height or self.default_sample_size * self.vae_scale_factor,
                width or self.default_sample_size * self.vae_scale_factor)

    def _check_latents(self, family: Family, latents: Any, batch: int, size: str) -> None:
        """Refuse ``latents=`` other than the pipeline's own layout for ``batch`` items of ``size`` (errors name both shapes)."""
        if latents is None:
            return
        shape = tuple(self._pack(family, torch.empty(batch, *family.shape, device="meta")).shape)
        if not isinstance(latents, Tensor) or tuple(latents.shape) != shape:
            got = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a tensor of shape {shape} ({self._latents_layout} for {batch} "
                             f"{self._per_prompt.split('_')[1]} (prompts x {self._per_prompt}) of {size}), got {got}")

    # ------------------------------------------------------------------ the run

    def _frame(self, family: Family, x: Tensor, sigma: float) -> Tensor:
        """The VE state ``x`` at ``sigma`` as the latents the diffusers pipeline holds there (the family's layout)."""
        return x

    def _unframe(self, family: Family, latents: Tensor, sigma: float) -> Tensor:
        """The inverse of :meth:`_frame`."""
        return latents

    def _pack(self, family: Family, latents: Tensor) -> Tensor:
        """Latents in the family's layout as the pipeline lays them out (FLUX: packed)."""
        return latents

    def _unpack(self, family: Family, latents: Tensor) -> Tensor:
        """The inverse of :meth:`_pack`."""
        return latents

    def _timestep(self, family: Family, i: int) -> Tensor:
        """The scheduler timestep the diffusers pipeline passes to ``callback_on_step_end`` at step ``i``."""
        raise NotImplementedError

    def _noise_dtype(self, family: Family) -> torch.dtype:
        """The dtype the pipeline's scheduler draws its step noise in (the flow schedulers: float32)."""
        return torch.float32

    def _scheduler_noise(self, family: Family, generator: Any, batch: int) -> Callable[[float, float], Tensor]:
        """The step noise the diffusers pipeline's scheduler draws, in its order, as a kdpp ``noise_sampler``.

        Each draw is ``randn_tensor`` of the pipeline's latent shape (its layout: FLUX's packed),
        from ``generator`` where the pipeline passes it to ``scheduler.step`` (``_generator_in_step``)
        and from torch's global RNG where it does not, on the execution device in the scheduler's
        dtype; returned in the family's layout.
        """
        from diffusers.utils.torch_utils import randn_tensor

        source = generator if self._generator_in_step else None
        shape = tuple(self._pack(family, torch.empty(batch, *family.shape, device="meta")).shape)
        dtype = self._noise_dtype(family)

        def draw(sigma: float, sigma_next: float) -> Tensor:
            return self._unpack(family, randn_tensor(shape, generator=source, device=family.device, dtype=dtype))

        return draw

    def _sample(self, family: Family, latents: Tensor, generator: Any, *, lam: Any, k: int | None,
                guided_steps: Sequence[int] | None, renoise: str | None, renoise_sigma: Any,
                callback_on_step_end: Callable[..., Mapping[str, Any]] | None = None,
                callback_on_step_end_tensor_inputs: Sequence[str] = (), tensors: Mapping[str, Any] | None = None,
                ) -> Tensor:
        """The denoising loop: :func:`kdpp.diffusers.sampling.sample` from the pipeline's initial ``latents``.

        ``latents`` are unit noise in the family's layout (what ``prepare_latents`` drew, unscaled);
        the solver noise is the pipeline scheduler's (:meth:`_scheduler_noise`), the teacher's
        renoising noise from the generators' seeds (:func:`generator_seeds`). With
        ``callback_on_step_end`` the run goes step by step (stages of the body, which equal the
        run in one go): after step ``i`` it gets ``(self, i, t, {name: value})`` for the names in
        ``callback_on_step_end_tensor_inputs`` (``"latents"``: the pipeline's latents, in its
        layout; the others from ``tensors``, the encoded prompts), may return new ``"latents"``
        (the run goes on from them) and may set ``self._interrupt`` (the run stops; the latents
        reached are returned). A returned value for another name is refused. Returns the final
        latents, as the pipeline holds them (the family's layout).
        """
        from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

        seeds = generator_seeds(generator, latents.shape[0], family.device)
        steps = len(family.sigmas) - 1
        self._num_timesteps = steps
        options = dict(seeds=seeds, lam=lam, k=k, guided_steps=guided_steps, renoise=renoise,
                       renoise_sigma=renoise_sigma, disable=True,
                       noise_sampler=self._scheduler_noise(family, generator, latents.shape[0]))
        with self.progress_bar(total=steps) as progress:
            if callback_on_step_end is None:
                return sampling.sample(family, latents=latents, callback=lambda info: progress.update(), **options)
            if family.preset.sampler.startswith("dpmpp_2m"):
                raise ValueError(f"callback_on_step_end runs the sampler step by step, which restarts the second-order "
                                 f"history of the preset's {family.preset.sampler!r}; leave callback_on_step_end out")
            if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
                callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
            x, sigma = None, float(family.sigmas[0])
            for i in range(steps):
                if self.interrupt:
                    break
                self._current_timestep = self._timestep(family, i)
                x = sampling.sample(family, latents=latents if i == 0 else None, x=x, start=i, stop=i + 1, **options)
                sigma = float(family.sigmas[i + 1])
                progress.update()
                current = self._pack(family, self._frame(family, x, sigma))
                given = {name: current if name == "latents" else (tensors or {}).get(name)
                         for name in callback_on_step_end_tensor_inputs}
                out = dict(callback_on_step_end(self, i, self._current_timestep, given) or {})
                edited = out.pop("latents", current)
                for name, value in out.items():
                    if name not in given or value is not given[name]:
                        raise ValueError(f"callback_on_step_end returned a new {name!r}: kdpp's pipelines take "
                                         "changes to latents only (the conditioning is fixed for the run)")
                if edited is not current:
                    x = self._unframe(family, self._unpack(family, edited).to(x.device), sigma).to(x.dtype)
            self._current_timestep = None
            return self._frame(family, x, sigma)

    def _guided(self, family_preset: Any, lam: Any, k: int | None, guided_steps: Sequence[int] | None) -> bool:
        """Whether the run calls the teacher (the preset's ``lam`` and ``k`` where not given)."""
        lam = family_preset.lam if lam is None else lam
        if guided_steps is None and k is None:
            k = family_preset.k
        return calls_teacher(lam, k, guided_steps)

    def _finish(self, images: Any, return_dict: bool, output: Callable[[Any], Any]) -> Any:
        self.maybe_free_model_hooks()
        return output(images) if return_dict else (images,)


def flow_scheduler_config(pipeline: Any, preset: Any) -> Mapping[str, Any]:
    """The pipeline's scheduler config where it is a ``FlowMatchEulerDiscreteScheduler`` (the loaded model's
    shift), else the preset's copy of the published one (the preset's sampler replaces the pipeline's scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = getattr(pipeline, "scheduler", None)
    return scheduler.config if isinstance(scheduler, FlowMatchEulerDiscreteScheduler) else preset.scheduler_config


def flow_teacher(preset: Any, teacher_guidance_scale: float | None) -> Any:
    """The preset's teacher with ``teacher_guidance_scale`` as its guidance: the guidance-embedding input of a
    teacher that has one (FLUX.1-dev), else its true CFG scale (``None``: the preset's)."""
    teacher = preset.teacher
    if teacher_guidance_scale is None:
        return teacher
    field = "guidance" if teacher.guidance is not None else "cfg_scale"
    return dataclasses.replace(teacher, **{field: teacher_guidance_scale})


class FlowLatentsMixin:
    """Flow pipelines hold the rectified-flow latents ``x_rf = x_ve / (1 + sigma)``; their timestep is ``1000 t``."""

    def _frame(self, family: Family, x: Tensor, sigma: float) -> Tensor:
        return x / (1 + sigma)

    def _unframe(self, family: Family, latents: Tensor, sigma: float) -> Tensor:
        return latents.float() * (1 + sigma)

    def _timestep(self, family: Family, i: int) -> Tensor:
        train_steps = flow_scheduler_config(self, family.preset).get("num_train_timesteps", 1000)
        return (family.ts[i] * train_steps).to(device=family.device, dtype=torch.float32)
