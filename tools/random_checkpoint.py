"""Random-weight Stable Diffusion checkpoints whose images depend on their prompt, for the WebUI integration tests.

    python tools/random_checkpoint.py sd15 sd15_random.safetensors
    PYTHONPATH=$A1111/repositories/generative-models $A1111/venv/bin/python \\
        tools/random_checkpoint.py sdxl sdxl_random_fp16.safetensors --fp16

How a checkpoint is made (``--seed`` seeds torch's generator once, before the first module is built):

- The modules are built, with their own random initialisation, from the family's config by the code the WebUIs run:
  SD1.5 from ``configs/v1-inference.yaml`` (its numbers are written out below) with the ``ldm`` package (A1111's
  ``stable-diffusion-stability-ai``, or ``stable-diffusion-sdkit``: the project's venv has it); SDXL from
  ``configs/inference/sd_xl_base.yaml`` beside the ``sgm`` package (A1111's ``repositories/generative-models``: run it
  with a Python that imports ``sgm`` and ``open_clip``, such as A1111's venv, as above). The UNet is ldm's or sgm's
  ``UNetModel``; the VAE is their ``Encoder`` and ``Decoder`` with AutoencoderKL's 1x1 ``quant_conv`` and
  ``post_quant_conv``; CLIP ViT-L/14 is transformers' ``CLIPTextModel`` with openai/clip-vit-large-patch14's text
  config (``position_ids`` stored as in the released checkpoints); SDXL's OpenCLIP ViT-bigG/14 is open_clip's text
  tower of its bundled ``ViT-bigG-14`` config with CLIP's ``logit_scale`` (no vision tower: SDXL stores none).
- ldm and sgm zero-initialise every ResBlock's output conv, every SpatialTransformer's ``proj_out`` and the UNet's
  final conv, so a fresh UNet predicts 0 noise and every image ignores its prompt. Each of those layers (found as the
  UNet's Conv/Linear layers whose weights are all zero: 39 in SD1.5, 29 in SDXL) gets the default initialisation of
  a fresh layer of its shape (weight and bias uniform in +-1/sqrt(fan_in)) times ``--scale``. At the default, 3,
  an SD1.5 UNet's noise prediction has a standard deviation of about 1 (0.33 at scale 1), and two random contexts
  change it by about 0.12 (standard deviation of the difference); on A1111, two prompts' 64x64 2-step Euler images
  (seed 7, CFG 7) then differ by 29/255 per pixel value on average, are finite and neither black nor white, and one
  prompt twice gives the same bytes.
- Every LayerNorm of the text encoders gets weight ~ N(1, 0.1) and bias ~ N(0, 0.1), as a trained model's are far
  from (1, 0): A1111's "Original" emphasis divides by the mean of the encoder's output, which is 0 up to rounding
  after a LayerNorm at (1, 0).
- Keys are prefixed as the released checkpoints have them: ``model.diffusion_model.``, ``first_stage_model.``,
  ``cond_stage_model.transformer.`` (SD1.5) or ``conditioner.embedders.0.transformer.`` and
  ``conditioner.embedders.1.model.`` (SDXL). No schedule buffers (ldm's ``alphas_cumprod`` and the like, sgm's
  ``denoiser.sigmas``) and no EMA: the WebUIs compute the schedule from the config; every other key of the model
  A1111 builds from the config is there, with its shape. ``--fp16`` stores every floating tensor as float16.

The file is written with ``safetensors`` under a temporary name, then renamed. SD1.5 takes 4.3 GB (float32) and
about 5 GB of memory to make; SDXL 6.9 GB (float16) and about 14.5 GB (safetensors 0.4, as A1111 pins it, copies
every tensor while saving): make it where nothing else large runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

# configs/v1-inference.yaml: unet_config and first_stage_config (AutoencoderKL's embed_dim 4)
SD15_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": False,
    "legacy": False,
}
SD15_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
VAE_EMBED_DIM = 4
# openai/clip-vit-large-patch14's text_config
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
DEFAULT_SCALE = 3.0


def prefixed(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {prefix + key: tensor for key, tensor in module.state_dict().items()}


def wake_unet(unet: torch.nn.Module, scale: float) -> int:
    """Give the UNet's zero-initialised layers a fresh layer's random weights times ``scale``; how many there were."""
    woken = 0
    for layer in unet.modules():
        if isinstance(layer, torch.nn.Conv2d | torch.nn.Conv1d | torch.nn.Linear) and not layer.weight.any():
            layer.reset_parameters()
            with torch.no_grad():
                layer.weight.mul_(scale)
                if layer.bias is not None:
                    layer.bias.mul_(scale)
            woken += 1
    return woken


def spread_layer_norms(encoder: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in encoder.modules():
            if isinstance(layer, torch.nn.LayerNorm):
                layer.weight.normal_(1, 0.1)
                layer.bias.normal_(0, 0.1)


def clip_l(prefix: str) -> dict[str, torch.Tensor]:
    """CLIP ViT-L/14's text model under ``prefix`` (which ends in ``transformer.``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    spread_layer_norms(model)
    # the released checkpoints nest it under text_model., as transformers did before version 5
    state = {key if key.startswith("text_model.") else "text_model." + key: tensor for key, tensor in model.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(CLIP_L["max_position_embeddings"]).unsqueeze(0)
    return {prefix + key: tensor for key, tensor in state.items()}


def vae(encoder_decoder, ddconfig: dict) -> dict[str, torch.Tensor]:
    """AutoencoderKL's weights: ``encoder_decoder`` is the ``diffusionmodules.model`` module of ldm or sgm."""
    z = ddconfig["z_channels"]
    autoencoder = torch.nn.ModuleDict(
        {
            "encoder": encoder_decoder.Encoder(**ddconfig),
            "decoder": encoder_decoder.Decoder(**ddconfig),
            "quant_conv": torch.nn.Conv2d(2 * z, 2 * VAE_EMBED_DIM, 1),
            "post_quant_conv": torch.nn.Conv2d(VAE_EMBED_DIM, z, 1),
        }
    )
    return prefixed("first_stage_model.", autoencoder)


def unet_weights(unet: torch.nn.Module, scale: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    woken = wake_unet(unet, scale)
    print(f"UNet: {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, {woken} zero-initialised layers filled")
    unet.to(dtype)  # in place, layer by layer: SDXL's float32 UNet alone is 10 GB
    return prefixed("model.diffusion_model.", unet)


def sd15(scale: float, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    import ldm.modules.diffusionmodules.model as encoder_decoder
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    yield unet_weights(UNetModel(**SD15_UNET), scale, dtype)
    yield clip_l("cond_stage_model.transformer.")
    yield vae(encoder_decoder, SD15_VAE)


def sdxl(scale: float, dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    import open_clip
    import sgm
    import sgm.modules.diffusionmodules.model as encoder_decoder
    from omegaconf import OmegaConf
    from open_clip.model import CLIPTextCfg, _build_text_tower
    from sgm.util import instantiate_from_config

    config = OmegaConf.load(Path(sgm.__file__).parents[1] / "configs" / "inference" / "sd_xl_base.yaml").model.params
    yield unet_weights(instantiate_from_config(config.network_config), scale, dtype)
    yield clip_l("conditioner.embedders.0.transformer.")
    bigg = open_clip.get_model_config("ViT-bigG-14")
    text = _build_text_tower(bigg["embed_dim"], CLIPTextCfg(**bigg["text_cfg"]))
    spread_layer_norms(text)
    text.to(dtype)  # in place: 2.8 GB in float32
    logit_scale = torch.ones([]) * torch.log(torch.tensor(1 / 0.07))  # open_clip's CLIP.__init__
    yield prefixed("conditioner.embedders.1.model.", text) | {"conditioner.embedders.1.model.logit_scale": logit_scale}
    yield vae(encoder_decoder, OmegaConf.to_container(config.first_stage_config.params.ddconfig))


FAMILIES = {"sd15": sd15, "sdxl": sdxl}


def make_checkpoint(family: str, path: Path, fp16: bool = False, seed: int = 0, scale: float = DEFAULT_SCALE) -> None:
    """Write a random ``family`` checkpoint to ``path`` (see the module docstring)."""
    torch.manual_seed(seed)
    dtype = torch.float16 if fp16 else torch.float32
    tensors: dict[str, torch.Tensor] = {}
    for part in FAMILIES[family](scale, dtype):
        for key, tensor in part.items():
            tensor = tensor.detach()
            assert tensor.is_floating_point() or key.endswith("position_ids"), key
            tensors[key] = (tensor.to(dtype) if tensor.is_floating_point() else tensor).contiguous()
    bad = [key for key, tensor in tensors.items() if tensor.is_floating_point() and not tensor.isfinite().all()]
    if bad:
        raise SystemExit(f"not finite: {bad[:5]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")  # then renamed: a WebUI reading the old file keeps its copy
    made = f"{family} seed={seed} scale={scale}"
    save_file(tensors, str(partial), metadata={"format": "pt", "alignit_random_checkpoint": made})
    partial.replace(path)
    print(f"{path}: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()) / 1e9:.2f}G values, {dtype}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", choices=sorted(FAMILIES))
    parser.add_argument("output", type=Path)
    parser.add_argument("--fp16", action="store_true", help="store floating tensors as float16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=DEFAULT_SCALE, help="scale of the zero-initialised UNet layers' weights")
    args = parser.parse_args()
    make_checkpoint(args.family, args.output, args.fp16, args.seed, args.scale)


if __name__ == "__main__":
    main()
