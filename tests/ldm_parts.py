"""UNets of the ldm code A1111 runs for SD1.x (``stable-diffusion-sdkit``), random weights."""

from __future__ import annotations

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel


def unet(context_dim: int, model_channels: int, channel_mult: list[int], attention_resolutions: list[int], **extra) -> UNetModel:
    torch.manual_seed(0)
    return UNetModel(
        image_size=32,
        in_channels=4,
        out_channels=4,
        model_channels=model_channels,
        attention_resolutions=attention_resolutions,
        channel_mult=channel_mult,
        use_spatial_transformer=True,
        transformer_depth=1,  # SD2's ldm SpatialTransformer runs one context through one block only
        context_dim=context_dim,
        legacy=False,
        **extra,
    ).eval()


def small_unet(context_dim: int = 32) -> UNetModel:
    """7 cross-attention layers, 32 channels."""
    return unet(context_dim, 32, [1, 2], [1, 2], num_res_blocks=1, num_head_channels=16)


def sd15_unet() -> UNetModel:
    """SD1.5's UNet (configs/v1-inference.yaml ``unet_config``): 16 cross-attention layers."""
    return unet(768, 320, [1, 2, 4, 4], [4, 2, 1], num_res_blocks=2, num_heads=8)


def tiny_sd15_unet(context_dim: int = 32) -> UNetModel:
    """SD1.5's block layout (16 cross-attention layers with SD1.5's names) at 32 channels."""
    return unet(context_dim, 32, [1, 2, 4, 4], [4, 2, 1], num_res_blocks=2, num_head_channels=16)


def alive(unet: UNetModel, seed: int = 1) -> UNetModel:
    """Small random values in the layers ldm initialises to zero (ResBlock output convs, ``proj_out``, the final conv),
    so that the UNet's output depends on its input and its context."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            if not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return unet


def weights_digest(module: torch.nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer's bytes, to show a model is bit-identical before and after."""
    return {name: tensor.detach().cpu().numpy().tobytes() for name, tensor in module.state_dict().items()}


def tiny_sdxl_unet() -> UNetModel:
    """SDXL's block layout and 2048-wide context at 32 channels: cross-attention at levels 2 and 3 only (one
    transformer block each where SDXL has 2 and 10), linear projections."""
    return unet(2048, 32, [1, 2, 4], [2, 4], num_res_blocks=2, num_head_channels=16, use_linear_in_transformer=True)


def sdxl_shaped_unet() -> UNetModel:
    """SDXL's widths (320 channels, mult 1, 2, 4, cross-attention at levels 2 and 3 only, 2048-wide context) with one
    transformer block per level where SDXL has 2 and 10: 11 cross-attention layers of SDXL's 70. No pooled-vector
    input (SDXL's ``label_emb``)."""
    return unet(2048, 320, [1, 2, 4], [2, 4], num_res_blocks=2, num_head_channels=64)
