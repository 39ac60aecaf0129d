"""diffusers models as kdpp denoisers: where a UNet or a flow transformer becomes ``D(x, sigma) -> x0``.

- :mod:`kdpp.diffusers.vp`: VP (DDPM-style) UNets as VE denoisers (:class:`VPDenoiser`).
- :mod:`kdpp.diffusers.presets`: how each distilled student family samples, and its teacher.
- :mod:`kdpp.diffusers.sampling`: the batch sampling every family's ``generate`` shares.
- :mod:`kdpp.diffusers.sdxl`: SDXL students with the SDXL base teacher (``generate``).
- :mod:`kdpp.diffusers.flow_models`: flow-matching transformers (SD3, FLUX) as denoisers, the shared flow ``generate``.
- :mod:`kdpp.diffusers.flow_presets`: the flow students (SD3.5 Large Turbo, FLUX.1-schnell, FLUX.1-dev LoRAs) and teachers.
- :mod:`kdpp.diffusers.sd3`, :mod:`kdpp.diffusers.flux`: each family's adapter and ``generate``.
- :mod:`kdpp.diffusers.lora`: LoRA students sampled from the teacher's own model (``SharedLoRAModel``).

Importing this package does not import diffusers; only decoding to images needs it (and PIL).
The pre-subpackage names ``kdpp.vp``, ``kdpp.presets`` and ``kdpp.sdxl`` stay importable.
"""
