"""ComfyUI's CLIP as AlignIT's text encoder.

p' is written as ComfyUI's own token lists (one per text encoder: ``l``, ``h``, or SDXL's ``g`` and ``l``, each padded
its own way, embedding vectors as tensor entries) with the weights of the tokens its rows stand for, and encoded by
``clip.encode_from_tokens``; ComfyUI's emphasis (``z = (z - z_empty)·w + z_empty`` at each weighted row,
comfy/sd1_clip.py 28-79) therefore treats p' exactly as it treats p, and a ``CLIPSetLastLayer`` on the CLIP applies to
both.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from comfy import sd1_clip
from comfy.ldm.modules.diffusionmodules import openaimodel

from ...errors import ConceptError, LayoutMismatch, Unsupported
from ...layout import CHUNK_ROWS, Chunk, EmbeddingMatch, LayoutOptions
from ...prompt import strip_markers
from . import layout

FAMILIES = {("l",): "SD1.x", ("h",): "SD2.x", ("g", "l"): "SDXL"}


def sd_streams(clip: Any) -> dict[str, Any]:
    """The CLIP's ``SDTokenizer`` per stream; Unsupported for text encoders of other model families (Flux, SD3, …)."""
    names = tuple(sorted(clip.tokenize("")))
    streams = {name: getattr(clip.tokenizer, f"clip_{name}", None) for name in names}
    if names not in FAMILIES or not all(
        isinstance(tokenizer, sd1_clip.SDTokenizer)
        and tokenizer.max_length == CHUNK_ROWS
        and tokenizer.start_token is not None
        and tokenizer.end_token is not None
        and not tokenizer.pad_left
        for tokenizer in streams.values()
    ):
        raise Unsupported(
            f"AlignIT applies to SD1.x, SD2.x and SDXL; this CLIP ({type(clip.cond_stage_model).__name__}, text encoders "
            f"{', '.join(names)}) is another model family's"
        )
    return streams


def unet(model: Any) -> torch.nn.Module:
    """The MODEL's UNet; Unsupported when it has none with cross-attention AlignIT knows (Flux, SD3: transformers)."""
    diffusion_model = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(diffusion_model, openaimodel.UNetModel):
        raise Unsupported(
            f"AlignIT applies to SD1.x, SD2.x and SDXL; this MODEL ({type(diffusion_model).__name__}) has no UNet cross-attention"
        )
    return diffusion_model


class ComfyEncoder:
    """``alignit.engine.TextEncoder`` over a ComfyUI CLIP; its layouts come from ComfyUI's own tokenizer (``layout``)."""

    layout_options = LayoutOptions()  # not used: ComfyUI's layout is read from its own tokenizer
    comma_token: int | None = None

    def __init__(self, clip: Any, streams: Mapping[str, Any]):
        self.clip = clip
        self.streams = dict(streams)
        self.first = self.streams[next(iter(self.streams))]
        self.id_start, self.id_end = self.first.start_token, self.first.end_token
        self.widths = {name: int(tokenizer.embedding_size) for name, tokenizer in self.streams.items()}
        self._encoding_clip = clip
        self._tokens: dict[str, layout.Tokens] = {}
        self._layouts: dict[str, list[Chunk]] = {}

    def plain_tokens(self, text: str) -> layout.Tokens:
        """ComfyUI's tokens of a prompt, with word ids (``clip.tokenize``, cached)."""
        if text not in self._tokens:
            self._tokens[text] = self.clip.tokenize(text, return_word_ids=True)
        return self._tokens[text]

    def lay_out(self, marked_text: str) -> list[Chunk]:
        """The checked chunks of a marked prompt (cached)."""
        if marked_text not in self._layouts:
            tokens = self.plain_tokens(strip_markers(marked_text))
            self._layouts[marked_text] = layout.lay_out(self.streams, marked_text, tokens)
        return self._layouts[marked_text]

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [layout.word_tokens(self.first, text) for text in texts]

    def find_embedding(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        return None  # ComfyUI marks embeddings with ``embedding:``; the layout reads them from its own tokenizer

    def check_layout(self, plain_text: str, chunks: Sequence[Chunk]) -> None:
        own = self.lay_out(plain_text)
        if [(c.tokens, c.multipliers) for c in own] != [(c.tokens, c.multipliers) for c in chunks]:
            raise LayoutMismatch(f"AlignIT lays out '{plain_text[:60]}' differently from ComfyUI")

    def embedding_handle(self, name: str, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
        """Vectors of a modifier token (Custom Diffusion), which holds one text encoder's vectors."""
        if len(self.streams) > 1:
            raise ConceptError(f"'{name}' holds one text encoder's vectors; an SDXL model needs clip_l and clip_g")
        return {next(iter(self.streams)): vectors}

    @contextlib.contextmanager
    def using(self, clip: Any) -> Iterator[None]:
        """Encode p' with another CLIP (a clone carrying a concept's LoRA text part) while the block runs."""
        self._encoding_clip, previous = clip, self._encoding_clip
        try:
            yield
        finally:
            self._encoding_clip = previous

    def token_lists(
        self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]
    ) -> dict[str, list[list[tuple[Any, float]]]]:
        """One chunk in ComfyUI's form per stream: ``(token or vector, weight)``, padding after the end token as that
        stream pads (SDXL's G and SD2's H with 0), vectors of ``fixes`` (offset without start, {stream: n x C})."""
        vectors: dict[int, dict[str, torch.Tensor]] = {}
        for offset, handle in fixes:
            for name, rows in handle.items():
                for j, vector in enumerate(rows):
                    if offset + 1 + j < CHUNK_ROWS - 1:
                        vectors.setdefault(offset + 1 + j, {})[name] = vector
        lists = {}
        for name, tokenizer in self.streams.items():
            chunk: list[tuple[Any, float]] = []
            ended = False
            for row, (token, weight) in enumerate(zip(tokens, multipliers)):
                if row in vectors:
                    chunk.append((vectors[row][name], float(weight)))
                    continue
                if ended:
                    token = tokenizer.pad_token
                ended = ended or (row > 0 and token == tokenizer.end_token)
                chunk.append((token, float(weight)))
            lists[name] = [chunk]
        return lists

    def encode_chunk(self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]) -> torch.Tensor:
        """77 x C rows of one chunk, encoded by ComfyUI (``encode_from_tokens``, comfy/sd.py 260)."""
        with torch.no_grad():
            rows = self._encoding_clip.encode_from_tokens(self.token_lists(tokens, multipliers, fixes))
        return rows[0]
