"""Tiny random CLIP and DINO models saved like hub checkpoints, and a small concepts fixture, for the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from clip_parts import clip_tokenizer
from PIL import Image
from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel


def save_tiny_clip(folder: Path) -> Path:
    """CLIP ViT-B/32's layout (224 px, 32 px patches, the real vocabulary) at width 32; tokenizer saved beside it."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
    )
    CLIPModel(config).eval().save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)
    return folder


def save_tiny_dino(folder: Path) -> Path:
    """DINO ViT-S/16's layout (224 px, 16 px patches) at width 32."""
    torch.manual_seed(1)
    config = ViTConfig(
        image_size=224, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
    )
    ViTModel(config, add_pooling_layer=False).eval().save_pretrained(folder)
    return folder


def blocks_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A picture of coloured blocks, reproducible from its seed."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.NEAREST)


def write_references(folder: Path, count: int, seed: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        blocks_image(seed * 100 + index, (80, 64)).save(folder / f"{index:02d}.jpg" if index % 2 else folder / f"{index:02d}.png")
    return folder


def write_concepts_yaml(root: Path, prompts: int = 3) -> Path:
    """Two concepts (one with a prompt file, one with a list), references and sources under ``root``."""
    write_references(root / "refs" / "cat", 3, 1)
    write_references(root / "refs" / "mug", 2, 2)
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    lines = ["photo of a {}.", "{} playing badminton.", "{} in times square.", "a painting of {}."][:prompts]
    (root / "prompts" / "cat.txt").write_text("\n".join(lines) + "\n\n")
    (root / "cat.safetensors").write_bytes(b"not read by the fake generator")
    mug_prompts = "".join(f"\n      - '{line}'" for line in ["a {} on a table", "a {} in the snow"][:prompts])
    (root / "concepts.yaml").write_text(
        f"""concepts:
  - name: cat
    source: cat.safetensors
    trigger: <new1>
    class_word: cat
    references: refs/cat
    prompts: prompts/cat.txt
  - name: mug
    source: someone/mug-lora
    trigger: <mug>
    class_word: coffee  mug
    strength: 0.8
    references: refs/mug
    prompts:{mug_prompts}
"""
    )
    return root / "concepts.yaml"
