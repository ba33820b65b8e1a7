"""Module names across the naming schemes of LoRA and Custom Diffusion files, mapped to the ldm UNet A1111 runs.

A cross-attention projection is named ``(layer, proj)``: ``layer`` like ``input_blocks.1.1.transformer_blocks.0.attn2``
(relative to ``model.diffusion_model``) and ``proj`` ``"k"`` or ``"v"``. Text-encoder modules are named by their path
inside the CLIP text transformer with dots as underscores, without ``text_model``: ``encoder_layers_0_self_attn_q_proj``.
"""

from __future__ import annotations

import re

_DIFFUSERS_BLOCK = re.compile(r"(down|up)_blocks[._](\d+)[._]attentions[._](\d+)|mid_block[._]attentions[._]0")
_LDM_BLOCK = re.compile(r"(input|output)_blocks[._](\d+)[._]1(?=[._])|middle_block[._]1(?=[._])")
_ATTN2 = re.compile(r"[._]transformer_blocks[._](\d+)[._]attn2[._](?:processor[._])?to_([kv])(?:_custom_diffusion|_lora)?\b")


def _ldm_block(key: str) -> str | None:
    match = _DIFFUSERS_BLOCK.search(key)
    if match:
        kind, block, attention = match.groups()
        if kind is None:
            return "middle_block.1"
        if kind == "down":
            return f"input_blocks.{3 * int(block) + int(attention) + 1}.1"
        return f"output_blocks.{3 * int(block) + int(attention)}.1"
    match = _LDM_BLOCK.search(key)
    if match is None:
        return None
    kind, block = match.groups()
    return "middle_block.1" if kind is None else f"{kind}_blocks.{block}.1"


def attn2_projection(key: str) -> tuple[str, str] | None:
    """``(layer, "k"|"v")`` of a file key naming a cross-attention to_k/to_v weight in any scheme, else None."""
    match = _ATTN2.search(key)
    block = _ldm_block(key) if match else None
    if match is None or block is None:
        return None
    return f"{block}.transformer_blocks.{match.group(1)}.attn2", match.group(2)


def text_module(key: str) -> str:
    """Normalized text-encoder module name of a file key's module part (``lora_te_text_model_encoder_…`` etc.)."""
    name = re.sub(r"^(lora_te[12]?_|text_encoder(_2)?\.|te\.)", "", key).replace(".", "_")
    return re.sub(r"^text_model_", "", name)
