"""diffusers models as kdpp denoisers: where a UNet (and, later, a transformer) becomes ``D(x, sigma) -> x0``.

- :mod:`kdpp.diffusers.vp`: VP (DDPM-style) UNets as VE denoisers (:class:`VPDenoiser`).
- :mod:`kdpp.diffusers.presets`: how each distilled student family samples, and its teacher.
- :mod:`kdpp.diffusers.sampling`: the batch sampling every family's ``generate`` shares.
- :mod:`kdpp.diffusers.sdxl`: SDXL students with the SDXL base teacher (``generate``).

Importing this package does not import diffusers; only decoding to images needs it (and PIL).
The pre-subpackage names ``kdpp.vp``, ``kdpp.presets`` and ``kdpp.sdxl`` stay importable.
"""
