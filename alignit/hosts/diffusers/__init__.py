"""AlignIT on diffusers' Stable Diffusion pipelines (SD 1.x/2.x and SDXL, txt2img and img2img).

``AlignIT(pipe, concepts)`` reads the concepts' sources once; calling it generates with AlignIT on, ``.plain(…)``
with the pipeline customized the ecosystem's way. ``image_generator`` is the evaluation's entry.
"""

from .flow import AlignIT
from .generator import image_generator, load_pipeline

__all__ = ["AlignIT", "image_generator", "load_pipeline"]
