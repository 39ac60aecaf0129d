"""ComfyUI as a :class:`kdpp.hosts.Host`: what kdpp's hosted samplers need to know about ComfyUI's models.

Importable without ComfyUI (it imports ``comfy`` only inside the calls that ComfyUI's own
models make); ``import kdpp.comfyui`` registers :data:`COMFYUI` with :func:`kdpp.hosts.register_host`,
so kdpp samplers registered into ``comfy.k_diffusion.sampling`` (:func:`kdpp.hosts.register`) and
the node pack's sampler follow ComfyUI's conventions:

- a ComfyUI sampler model is a ``KSamplerX0Inpaint`` whose guider's model has ``model_sampling``;
- CONST (rectified-flow) models keep ``x`` in the RF frame with ``sigma = t``;
- ``extra_args["seed"]`` is the run's seed, and the solver noise is ComfyUI's own
  ``default_noise_sampler(x, seed)``, so ``lam = 0`` is ComfyUI's built-in sampler;
- ``seed``, ``model_options`` and ``denoise_mask`` belong to ComfyUI, never to a teacher;
- a CFG++ student reads the unconditional x0 the way ComfyUI's own CFG++ samplers do.
"""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ..hosts import Host
from ..noise import NoiseSampler


def model_sampling(model: Any) -> Any:
    """The ``model_sampling`` of a ComfyUI sampler model (``KSamplerX0Inpaint`` -> guider -> model), else ``None``."""
    return getattr(getattr(getattr(model, "inner_model", None), "inner_model", None), "model_sampling", None)


def is_flow_sampling(sampling: Any) -> bool:
    """Whether a ComfyUI ``model_sampling`` object is CONST (rectified flow: x in the RF frame, sigma = t)."""
    return any(c.__name__ == "CONST" for c in type(sampling).__mro__)


class ComfyUIHost(Host):
    """ComfyUI's conventions (see the module docstring)."""

    name = "ComfyUI"
    host_only_keys = frozenset({"seed", "model_options", "denoise_mask"})

    def owns(self, model: Any) -> bool:
        return model_sampling(model) is not None

    def is_flow(self, model: Any) -> bool:
        return is_flow_sampling(model_sampling(model))

    def seed(self, extra_args: Mapping[str, Any]) -> int | None:
        seed = extra_args.get("seed")
        return None if seed is None else int(seed)

    def noise_sampler(self, model: Any, x: Tensor, seed: int | None) -> NoiseSampler:
        from comfy.k_diffusion.sampling import default_noise_sampler

        return default_noise_sampler(x, seed=seed)

    def student(self, model: Any, extra_args: Mapping[str, Any], cfg_pp: bool) -> Any:
        return CFGPPStudent(model, extra_args) if cfg_pp else model


class CFGPPStudent:
    """A ComfyUI sampler model with ``guided_and_uncond``: a post-CFG function records ``uncond_denoised``
    (with the CFG 1 shortcut disabled), as ComfyUI's own CFG++ samplers read it."""

    def __init__(self, model_k: Any, extra_args: Mapping[str, Any]):
        import comfy.model_patcher

        self.model_k, self.uncond = model_k, None
        options = dict(extra_args.get("model_options", {}))
        options = comfy.model_patcher.set_model_options_post_cfg_function(options, self._record,
                                                                          disable_cfg1_optimization=True)
        self.model_options = options

    def _record(self, args: dict) -> Tensor:
        self.uncond = args["uncond_denoised"]
        return args["denoised"]

    def __call__(self, x: Tensor, sigma: Tensor, **extra: Any) -> Tensor:
        return self.model_k(x, sigma, **{**extra, "model_options": self.model_options})

    def guided_and_uncond(self, x: Tensor, sigma: Tensor, **extra: Any) -> tuple[Tensor, Tensor]:
        self.uncond = None  # set by ComfyUI's post-CFG hook during this call, never left from an earlier one
        guided = self(x, sigma, **extra)
        if self.uncond is None:
            raise RuntimeError("CFG++ needs the student's unconditional estimate from ComfyUI's post-CFG hook, "
                               "which did not run (another node replaced the post-CFG functions?)")
        return guided, self.uncond


#: ComfyUI's host conventions (registered by ``import kdpp.comfyui``)
COMFYUI = ComfyUIHost()
