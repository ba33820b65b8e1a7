"""Real CLIP parts for tests: the CLIP BPE vocabulary from open_clip_torch and small random CLIP text models."""

from __future__ import annotations

import gzip
import json
from collections import OrderedDict
from functools import lru_cache
from importlib.metadata import distribution
from pathlib import Path
from types import SimpleNamespace

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


def open_clip_vit_bigg_text_model() -> OpenClipText:
    """OpenCLIP ViT-bigG/14's text tower (SDXL's second encoder, as sgm wraps it) from its sizes: 1280 wide, 32
    layers, 20 heads."""
    return open_clip_text_model(1280, layers=32, heads=20)


class _ResidualAttentionBlock(torch.nn.Module):
    """open_clip 2.20 transformer.py ``ResidualAttentionBlock`` (l.190-245): pre-norm ``nn.MultiheadAttention``
    (sequence first), then an MLP ``c_fc`` → GELU → ``c_proj``."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(width)
        self.attn = torch.nn.MultiheadAttention(width, heads)
        self.ln_2 = torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Sequential(
            OrderedDict(
                [
                    ("c_fc", torch.nn.Linear(width, width * 4)),
                    ("gelu", torch.nn.GELU()),
                    ("c_proj", torch.nn.Linear(width * 4, width)),
                ]
            )
        )

    def forward(self, x, attn_mask=None):
        q_x = self.ln_1(x)
        x = x + self.attn(q_x, q_x, q_x, need_weights=False, attn_mask=attn_mask.to(q_x.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(torch.nn.Module):
    """open_clip 2.20 transformer.py ``Transformer`` (l.280-312): ``width``, ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.resblocks = torch.nn.ModuleList([_ResidualAttentionBlock(width, heads) for _ in range(layers)])


class OpenClipText(torch.nn.Module):
    """An open_clip text tower as A1111 runs SDXL's OpenCLIP-G: open_clip 2.20's parts (token and positional
    embeddings, ``transformer``, ``ln_final``, the causal ``attn_mask`` of ``build_attention_mask``) run as sgm's
    ``FrozenOpenCLIPEmbedder2.encode_with_transformer`` runs them (encoders/modules.py 466-505: sequence first, the
    output of the layer the config names: ``penultimate`` for SDXL, before the last block and ``ln_final``). It has the
    face of a transformers CLIP text model (``config.hidden_size``, input embeddings, ``last_hidden_state`` and
    ``hidden_states``), so the reference encoder (``hf_clip``) drives it as it drives CLIP."""

    def __init__(self, width: int, layers: int, heads: int, layer: str = "penultimate"):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=width)
        self.layer = layer
        self.token_embedding = torch.nn.Embedding(49408, width)
        self.positional_embedding = torch.nn.Parameter(torch.randn(77, width) * 0.01)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_final = torch.nn.LayerNorm(width)
        self.final_layer_norm = self.ln_final
        self.register_buffer("attn_mask", torch.empty(77, 77).fill_(float("-inf")).triu_(1), persistent=False)

    def get_input_embeddings(self):
        return self.token_embedding

    def set_input_embeddings(self, embedding):
        self.token_embedding = embedding

    def forward(self, input_ids, output_hidden_states=False):
        x = (self.token_embedding(input_ids) + self.positional_embedding).permute(1, 0, 2)
        states = [x.permute(1, 0, 2)]
        for block in self.transformer.resblocks:
            x = block(x, attn_mask=self.attn_mask)
            states.append(x.permute(1, 0, 2))
        z = states[-2] if self.layer == "penultimate" else self.ln_final(states[-1])
        return SimpleNamespace(last_hidden_state=z, hidden_states=tuple(states))


def open_clip_text_model(width: int, layers: int, heads: int, seed: int = 0) -> OpenClipText:
    """A random open_clip text tower (LayerNorms random as in trained models, see ``clip_text_model``)."""
    torch.manual_seed(seed)
    model = OpenClipText(width, layers, heads).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.bias.normal_(0, 0.1)
                module.weight.normal_(1, 0.1)
    return model
