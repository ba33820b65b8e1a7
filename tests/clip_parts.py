"""Real CLIP parts for tests: the CLIP BPE vocabulary from open_clip_torch and small random CLIP text models."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib.metadata import distribution
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP tokenizer's vocabulary and merges, from the BPE file open_clip_torch ships."""
    bpe = Path(str(distribution("open_clip_torch").locate_file("open_clip/bpe_simple_vocab_16e6.txt.gz")))
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, merges


def write_clip_tokenizer_files(folder: Path) -> Path:
    """vocab.json and merges.txt in the Hugging Face layout."""
    vocab, merges = clip_vocab_and_merges()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return folder


@lru_cache(maxsize=1)
def clip_tokenizer() -> CLIPTokenizer:
    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def clip_text_model(hidden: int, layers: int, heads: int, seed: int = 0) -> CLIPTextModel:
    """A random CLIP text model with the real vocabulary; LayerNorms random as in trained models (all-zero biases
    make A1111's "Original" emphasis divide 0 by 0)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    model = CLIPTextModel(config).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0, 0.1)
                module.weight.normal_(1, 0.1)
    return model


def small_clip_text_model(hidden: int = 32) -> CLIPTextModel:
    return clip_text_model(hidden, layers=3, heads=4)


def clip_vit_l_text_model() -> CLIPTextModel:
    """CLIP ViT-L/14's text encoder (SD1.x) from its config: 768 wide, 12 layers, 12 heads."""
    return clip_text_model(768, layers=12, heads=12)


def clip_vit_bigg_text_model() -> CLIPTextModel:
    """OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder) from its sizes: 1280 wide, 32 layers, 20 heads."""
    return clip_text_model(1280, layers=32, heads=20)
