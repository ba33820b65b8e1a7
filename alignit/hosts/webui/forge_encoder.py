"""Forge's text encoders as AlignIT sees them: its classic text-processing engines
(``backend/text_processing/classic_engine.py``), one for SD1.x/SD2.x (``text_processing_engine``) or SDXL's two
(``text_processing_engine_l``/``_g``, rows concatenated to 2048 as ``backend/diffusion_engine/sdxl.py`` does)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from backend import memory_management
from backend.text_processing import emphasis
from backend.text_processing.classic_engine import PromptChunkFix
from modules import shared

from ...engine import check_same_layout
from ...errors import NotLoaded, Unsupported
from ...layout import Chunk, EmbeddingMatch, LayoutOptions
from ...text_lora import TextTower
from . import sources as webui_sources

COMMA_BACKTRACK = 20  # classic_engine.py tokenize_line: fixed there, not read from the setting as on A1111


def text_engines(sd_model: Any) -> list[Any]:
    """The model's classic text engines; Unsupported for models AlignIT cannot reach (Flux, SD3)."""
    if getattr(sd_model, "forge_objects", None) is None:  # modules/sd_models.py:385 FakeInitialModel, until a load
        raise NotLoaded("no checkpoint is loaded yet")
    if getattr(sd_model, "is_sd3", False) or not (
        getattr(sd_model, "is_sd1", False) or getattr(sd_model, "is_sd2", False) or getattr(sd_model, "is_sdxl", False)
    ):
        raise Unsupported(
            f"AlignIT applies to SD1.x, SD2.x and SDXL models; this one ({type(sd_model).__name__}) has no UNet "
            "cross-attention to work on"
        )
    for names in (["text_processing_engine"], ["text_processing_engine_l", "text_processing_engine_g"]):
        engines = [getattr(sd_model, name, None) for name in names]
        if all(engine is not None for engine in engines):
            return engines
    raise Unsupported(f"this model ({type(sd_model).__name__}) has no classic text-processing engine")


class ForgeEncoder:
    """Encodes p' with Forge's own engines; lays prompts out and checks them with their tokenizers."""

    def __init__(self, sd_model: Any):
        self.sd_model = sd_model
        self.engines = text_engines(sd_model)
        first = self.engines[0]
        self.is_sdxl = len(self.engines) > 1
        self.towers = [TextTower(engine.text_encoder.transformer) for engine in self.engines]  # where LoRA text parts go
        self.width = self.towers[0].width
        self.id_start, self.id_end, self.comma_token = first.id_start, first.id_end, first.comma_token
        self.layout_options = LayoutOptions(parse_emphasis=shared.opts.emphasis != "None", comma_backtrack=COMMA_BACKTRACK)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.engines[0].tokenize(list(texts))

    def find_embedding(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        embedding, length = self.engines[0].embeddings.find_embedding_at_position(tokens, position)
        return None if embedding is None else EmbeddingMatch(int(embedding.vectors), length, embedding)

    def _own_layout(self, engine: Any, plain_text: str) -> list[Any]:
        engine.emphasis = emphasis.get_current_option(shared.opts.emphasis)()  # as the engine's __call__ sets it
        return engine.tokenize_line(plain_text)[0]

    def check_layout(self, plain_text: str, chunks: Sequence[Chunk]) -> None:
        check_same_layout(plain_text, chunks, (self._own_layout(engine, plain_text) for engine in self.engines))

    def embedding_handle(self, name: str, vectors: torch.Tensor) -> Any:
        return webui_sources.embedding_handle(name, vectors, self.is_sdxl)

    def encode_chunk(self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]) -> torch.Tensor:
        return self.encode_chunks([tokens], [multipliers], [fixes])[0]

    def encode_chunks(
        self, tokens: Sequence[Sequence[int]], multipliers: Sequence[Sequence[float]], fixes: Sequence[Sequence[tuple[int, Any]]]
    ) -> torch.Tensor:
        """A batch of chunks through each engine's ``process_tokens`` (classic_engine.py 297-318), as ``__call__`` does."""
        memory_management.load_model_gpu(self.sd_model.forge_objects.clip.patcher)
        self.sd_model.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))
        rows = []
        for engine in self.engines:
            engine.emphasis = emphasis.get_current_option(shared.opts.emphasis)()
            engine.embeddings.fixes = [[PromptChunkFix(offset, embedding) for offset, embedding in chunk] for chunk in fixes]
            rows.append(engine.process_tokens([list(t) for t in tokens], [list(m) for m in multipliers]))
        return torch.cat(rows, dim=-1)
