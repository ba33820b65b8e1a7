"""comfy/ldm/modules/diffusionmodules/openaimodel.py ``UNetModel`` (l.375): the SD1.x/SD2.x/SDXL UNet, with the
ldm layer names (``input_blocks.N.1.transformer_blocks.M.attn2.to_k``). The contract's is the ldm UNet A1111 runs
(``stable-diffusion-sdkit``), which has the same modules; how ComfyUI's forward sets ``transformer_options``
(``block`` l.872/886/893, ``transformer_index`` l.847) is mirrored in tests/comfy_flow.py."""

from ldm.modules.diffusionmodules.openaimodel import UNetModel

__all__ = ["UNetModel"]
