"""A1111's own text encoders as AlignIT sees them: one ``FrozenCLIPEmbedderWithCustomWords`` (SD1.x) or
``FrozenOpenCLIPEmbedderWithCustomWords`` (SD2.x), or SDXL's two (CLIP-L ``clip_l`` and OpenCLIP-G ``clip_g``, rows
concatenated to 2048 as ``sd_models_xl`` does). Each wraps a transformers CLIP text model (``wrapped.transformer``)
or an open_clip model (``wrapped.model``, whose ``transformer`` is the text tower)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from modules import devices, shared
from modules.sd_hijack_clip import PromptChunkFix

from ...engine import check_same_layout
from ...errors import Unsupported
from ...layout import Chunk, EmbeddingMatch, LayoutOptions
from ...text_lora import TextTower
from . import sources as webui_sources


def text_tower(clip: Any) -> TextTower:
    """The transformer a LoRA's text part acts on, in one of the WebUI's prompt encoders."""
    wrapped = clip.wrapped
    if hasattr(wrapped, "transformer"):  # ldm/sgm FrozenCLIPEmbedder
        return TextTower(wrapped.transformer)
    return TextTower(wrapped.model.transformer, open_clip=True)  # ldm FrozenOpenCLIPEmbedder, sgm …Embedder2


def text_encoders(cond_stage_model: Any) -> list[Any]:
    """The WebUI's prompt encoders of a model: the model itself, or SDXL's conditioner's text embedders."""
    candidates = getattr(cond_stage_model, "embedders", None) or [cond_stage_model]
    encoders = [e for e in candidates if hasattr(e, "tokenize_line") and hasattr(e, "process_tokens")]
    if not encoders:
        raise Unsupported(f"this model's text encoder ({type(cond_stage_model).__name__}) is not supported")
    return encoders


class A1111Encoder:
    """Encodes p' with the WebUI's own text encoder(s); lays prompts out and checks them with their tokenizers."""

    def __init__(self, cond_stage_model: Any):
        if shared.opts.use_old_emphasis_implementation:
            raise Unsupported("AlignIT does not work with the setting 'Use old emphasis implementation'")
        self.clips = text_encoders(cond_stage_model)
        first = self.clips[0]
        self.is_sdxl = len(self.clips) > 1
        self.towers = [text_tower(clip) for clip in self.clips]  # where a LoRA's text parts go (SDXL: te1, te2)
        self.width = self.towers[0].width
        self.id_start, self.id_end, self.comma_token = first.id_start, first.id_end, first.comma_token
        self.layout_options = LayoutOptions(
            parse_emphasis=shared.opts.emphasis != "None",
            comma_backtrack=shared.opts.comma_padding_backtrack,
        )

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.clips[0].tokenize(list(texts))

    def find_embedding(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        embedding, length = self.clips[0].hijack.embedding_db.find_embedding_at_position(tokens, position)
        return None if embedding is None else EmbeddingMatch(int(embedding.vectors), length, embedding)

    def check_layout(self, plain_text: str, chunks: Sequence[Chunk]) -> None:
        check_same_layout(plain_text, chunks, (clip.tokenize_line(plain_text)[0] for clip in self.clips))

    def embedding_handle(self, name: str, vectors: torch.Tensor) -> Any:
        return webui_sources.embedding_handle(name, vectors, self.is_sdxl)

    def encode_chunk(self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]) -> torch.Tensor:
        return self.encode_chunks([tokens], [multipliers], [fixes])[0]

    def encode_chunks(
        self, tokens: Sequence[Sequence[int]], multipliers: Sequence[Sequence[float]], fixes: Sequence[Sequence[tuple[int, Any]]]
    ) -> torch.Tensor:
        """A batch of chunks through each encoder's ``process_tokens`` (sd_hijack_clip.py 253), as ``forward`` does."""
        rows = []
        with devices.autocast():
            for clip in self.clips:
                clip.hijack.fixes = [[PromptChunkFix(offset, embedding) for offset, embedding in chunk] for chunk in fixes]
                try:
                    rows.append(clip.process_tokens([list(t) for t in tokens], [list(m) for m in multipliers]))
                finally:  # the token embedding takes them; an error before that must not leave them to the next encoding
                    clip.hijack.fixes = None
        return torch.cat(rows, dim=-1)
