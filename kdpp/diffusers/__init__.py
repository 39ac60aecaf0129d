"""diffusers models as kdpp denoisers, and one generation body over model families.

- :mod:`kdpp.diffusers.sampling`: the one body (:func:`~kdpp.diffusers.sampling.sample`) every family's
  ``generate`` runs, the :class:`~kdpp.diffusers.sampling.Family` interface, decoding.
- :mod:`kdpp.diffusers.vp`: VP (DDPM-style) UNets as VE denoisers (:class:`~kdpp.diffusers.vp.VPDenoiser`).
- :mod:`kdpp.diffusers.presets`: how each distilled SDXL student samples, and its teacher.
- :mod:`kdpp.diffusers.sdxl`: the SDXL family (``SDXLFamily``, ``generate``).
- :mod:`kdpp.diffusers.flow_models`: flow-matching transformers as denoisers, the flow families' shared side.
- :mod:`kdpp.diffusers.flow_presets`: the flow students (SD3.5 Large Turbo, FLUX.1-schnell, FLUX.1-dev LoRAs,
  the lightx2v Wan 2.1 LoRA) and teachers.
- :mod:`kdpp.diffusers.sd3`, :mod:`kdpp.diffusers.flux`, :mod:`kdpp.diffusers.wan`: each family's adapter,
  family and ``generate``.
- :mod:`kdpp.diffusers.lora`: LoRA students sampled from the teacher's own model (``SharedLoRAModel``), any family.
- :mod:`kdpp.diffusers.pipelines`: the families' diffusers pipelines with a teacher (``from_pipe``, prompt strings
  in, diffusers' output classes out), on top of the body; importing it imports diffusers.

Importing this package does not import diffusers; only decoding (and the flow schedules) need it.
"""
