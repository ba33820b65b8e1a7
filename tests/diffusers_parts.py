"""Tiny diffusers pipelines in the SD1.5 and SDXL layouts, built from configs with random weights and the real CLIP
vocabulary, saved like hub models so the tests load them with ``from_pretrained`` (the real loading code).

The UNets keep the SD block structure (two resnets and a resampler per level, cross-attention where SD has it, SDXL's
first level without), so their cross-attention layers have the ldm names LoRA and Custom Diffusion files use.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from clip_parts import clip_vocab_and_merges
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

TEXT_WIDTH = 32
"""Width of every tiny text encoder (SDXL's rows are two of them side by side: 64)."""
IMAGE_SIZE = 32
"""Pixels per side of a generated image (the VAE halves it: a 16x16 latent)."""


def tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """The real CLIP tokenizer, 77 tokens long; SDXL's second one pads with ``!`` (id 0)."""
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token=pad_token,
        unk_token="<|endoftext|>",
        model_max_length=77,
    )


def _text_config(seed: int) -> CLIPTextConfig:
    torch.manual_seed(seed)
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_WIDTH,
        intermediate_size=TEXT_WIDTH * 4,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=TEXT_WIDTH,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _randomize_norms(model: torch.nn.Module) -> torch.nn.Module:
    """LayerNorms random as in trained models (not all ones and zeros)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0, 0.1)
                module.weight.normal_(1, 0.1)
    return model.eval()


def text_encoder(seed: int = 0) -> CLIPTextModel:
    return _randomize_norms(CLIPTextModel(_text_config(seed)))


def text_encoder_with_projection(seed: int = 1) -> CLIPTextModelWithProjection:
    return _randomize_norms(CLIPTextModelWithProjection(_text_config(seed)))


def vae() -> AutoencoderKL:
    torch.manual_seed(2)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    ).eval()


def sd15_unet() -> UNet2DConditionModel:
    """SD1.5's layout: cross-attention in the first three levels and the middle; 16 attn2 layers."""
    torch.manual_seed(3)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=2,
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def sdxl_unet() -> UNet2DConditionModel:
    """SDXL's layout: no attention in the first level, one transformer block in the second, two in the third and
    the middle (SDXL has 2 and 10), the pooled text and size conditioning of ``text_time``."""
    torch.manual_seed(4)
    return UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=2 * TEXT_WIDTH,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + TEXT_WIDTH,
        norm_num_groups=8,
    ).eval()


def scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def sd15_pipeline() -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae(),
        text_encoder=text_encoder(),
        tokenizer=tokenizer(),
        unet=sd15_unet(),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline() -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae(),
        text_encoder=text_encoder(),
        text_encoder_2=text_encoder_with_projection(),
        tokenizer=tokenizer(),
        tokenizer_2=tokenizer(pad_token="!"),
        unet=sdxl_unet(),
        scheduler=scheduler(),
    )


BUILDERS = {"sd15": sd15_pipeline, "sdxl": sdxl_pipeline}


@lru_cache(maxsize=2)
def _saved(kind: str, root: str) -> Path:
    folder = Path(root) / kind
    BUILDERS[kind]().save_pretrained(folder)
    return folder


def saved_pipeline(kind: str, root: Path) -> Path:
    """A tiny pipeline of ``kind`` ("sd15" or "sdxl") saved under ``root`` (once per root)."""
    return _saved(kind, str(root))


def load_pipeline(folder: Path) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """A saved tiny pipeline, loaded the way users load models."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Recorder:
    """A cross-attention processor set before AlignIT: attention from the k and v its layer's ``to_k``/``to_v`` give
    (diffusers' ``AttnProcessor`` maths), recording ``(layer, context, k, v)`` of every call."""

    def __init__(self, name: str, calls: list):
        self.name = name
        self.calls = calls

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        self.calls.append((self.name, encoder_hidden_states.detach().clone(), key.detach().clone(), value.detach().clone()))
        query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
        out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(query, key, None), value))
        return attn.to_out[1](attn.to_out[0](out))


def record_cross_attention(unet: torch.nn.Module) -> list:
    """Set a ``Recorder`` on every cross-attention layer; returns the list its calls go to."""
    calls: list = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.set_processor(Recorder(name, calls))
    return calls


def record_custom_diffusion(unet: torch.nn.Module) -> list:
    """Record ``(layer, context, k, v)`` from each layer's Custom Diffusion processor (its own to_k/to_v)."""
    calls: list = []
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            processor = module.processor
            seen: dict = {}

            def keep(kind, seen=seen, name=name):
                def hook(m, inputs, output):
                    seen[kind] = (inputs[0].detach().clone(), output.detach().clone())
                    if len(seen) == 2:
                        (context, k), (_, v) = seen.pop("k"), seen.pop("v")
                        calls.append((name, context, k, v))

                return hook

            processor.to_k_custom_diffusion.register_forward_hook(keep("k"))
            processor.to_v_custom_diffusion.register_forward_hook(keep("v"))
    return calls


def text_lora_factors(text_model: torch.nn.Module, rank: int = 2, seed: int = 1) -> dict:
    """Known factors for a text encoder's attention projections, by dotted path without ``text_model.`` (with
    ``out_proj``, as kohya trains it: diffusers 0.42 cannot tell the format of a kohya text part without one)."""
    generator = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in text_model.named_modules():
        if name.endswith(("q_proj", "k_proj", "v_proj", "out_proj")):
            out, inp = module.weight.shape
            down, up = torch.randn(rank, inp, generator=generator), torch.randn(out, rank, generator=generator)
            factors[name.removeprefix("text_model.")] = (down * 0.3, up * 0.3, torch.tensor(1.0))
    return factors


def lora_state(unet_factors: dict, text_parts: list[dict], scheme: str) -> dict[str, torch.Tensor]:
    """A LoRA for an SD or SDXL pipeline: ``kohya`` (``lora_unet_``, ``lora_te_``/``lora_te1_``+``lora_te2_``) or
    ``peft`` (``unet.``, ``text_encoder.``, ``text_encoder_2.``) keys; ``text_parts`` per text encoder."""
    from weight_files import lora_state as unet_state

    state = unet_state(unet_factors, None, scheme)
    kohya = ["lora_te_"] if len(text_parts) == 1 else ["lora_te1_", "lora_te2_"]
    peft = ["text_encoder.", "text_encoder_2."]
    for index, factors in enumerate(text_parts):
        for name, (down, up, alpha) in factors.items():
            if scheme == "peft":
                base = f"{peft[index]}text_model.{name}"
                state |= {f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up}
            else:
                base = kohya[index] + "text_model_" + name.replace(".", "_")
                state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha}
    return state


def set_custom_diffusion(unet: torch.nn.Module, weights: dict) -> None:
    """diffusers' Custom Diffusion processors (k/v trained, as its example script's default ``crossattn_kv``) on every
    cross-attention layer, with ``weights[(ldm layer, "k"|"v")]``."""
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

    from alignit.sources.names import attn2_projection

    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            layer = attn2_projection(f"{name}.to_k")[0]
            size, width = module.to_k.out_features, module.to_k.in_features
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=size, cross_attention_dim=width
            )
            processor.to_k_custom_diffusion.weight.data = weights[(layer, "k")].clone()
            processor.to_v_custom_diffusion.weight.data = weights[(layer, "v")].clone()
            module.set_processor(processor)


def load_sdxl_embedding(pipe, token: str, vectors: dict) -> None:
    """An SDXL embedding loaded as diffusers' documentation does: ``clip_l`` and ``clip_g`` into each encoder."""
    pairs = {"clip_l": (pipe.text_encoder, pipe.tokenizer), "clip_g": (pipe.text_encoder_2, pipe.tokenizer_2)}
    for key, (encoder, tokenizer) in pairs.items():
        pipe.load_textual_inversion(vectors[key], token=token, text_encoder=encoder, tokenizer=tokenizer)
