"""A text encoder built on a transformers CLIP model that encodes prompts the way the A1111 WebUI does.

The tests' reference encoder: the same chunking, emphasis modes, CLIP skip and embedding insertion as A1111's
``sd_hijack_clip`` / ``sd_emphasis`` / ``sd_hijack.EmbeddingsWithFixes``, on a transformers CLIP text model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from alignit.errors import LayoutMismatch
from alignit.layout import Chunk, EmbeddingMatch, LayoutOptions, layout_prompt

EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


class _TokenEmbeddingWithFixes(torch.nn.Module):
    """Token embedding that writes pending embedding vectors over their placeholder rows."""

    def __init__(self, wrapped: torch.nn.Embedding):
        super().__init__()
        self.wrapped = wrapped
        self.pending: list[Sequence[tuple[int, torch.Tensor]]] | None = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.wrapped(input_ids)
        batch_fixes, self.pending = self.pending, None
        if not batch_fixes:
            return embeds
        rows = []
        for fixes, tensor in zip(batch_fixes, embeds):
            for offset, vectors in fixes:
                count = min(tensor.shape[0] - offset - 1, vectors.shape[0])
                tensor = torch.cat([tensor[: offset + 1], vectors[:count].to(tensor), tensor[offset + 1 + count :]])
            rows.append(tensor)
        return torch.stack(rows)


class HFClipEncoder:
    """Encodes prompts with a transformers ``CLIPTextModel`` and tokenizer, A1111 style.

    ``embeddings`` maps an embedding's name to its vectors (n x C); names are found in prompts by their tokens.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        *,
        embeddings: Mapping[str, torch.Tensor] | None = None,
        clip_skip: int = 1,
        emphasis: str = "Original",
        comma_backtrack: int = 20,
    ):
        if emphasis not in EMPHASIS_MODES:
            raise ValueError(f"emphasis must be one of {EMPHASIS_MODES}")
        self.model = model
        self.text_model = model
        self.width = model.config.hidden_size
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
        self.emphasis = emphasis
        self.layout_options = LayoutOptions(parse_emphasis=emphasis != "None", comma_backtrack=comma_backtrack)
        vocab = tokenizer.get_vocab()
        self.comma_token = vocab.get(",</w>")
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        embedding = model.get_input_embeddings()
        if not isinstance(embedding, _TokenEmbeddingWithFixes):
            embedding = _TokenEmbeddingWithFixes(embedding)
            model.set_input_embeddings(embedding)
        self._token_embedding = embedding
        self.embeddings: dict[str, torch.Tensor] = {}
        self._lookup: dict[int, list[tuple[list[int], str]]] = {}
        for name, vectors in (embeddings or {}).items():
            self.add_embedding(name, vectors)

    def add_embedding(self, name: str, vectors: torch.Tensor) -> None:
        """Register an embedding under ``name`` (found in prompts by the name's tokens, longest name first)."""
        self.embeddings[name] = vectors
        ids = self.tokenize([name])[0]
        entries = self._lookup.setdefault(ids[0], [])
        entries[:] = sorted([e for e in entries if e[1] != name] + [(ids, name)], key=lambda e: -len(e[0]))

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return self.tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

    def find_embedding(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        for ids, name in self._lookup.get(tokens[position], []):
            if list(tokens[position : position + len(ids)]) == ids:
                return EmbeddingMatch(self.embeddings[name].shape[0], len(ids), self.embeddings[name])
        return None

    def embedding_handle(self, name: str, vectors: torch.Tensor) -> torch.Tensor:
        return vectors

    def check_layout(self, plain_text: str, chunks: Sequence[Chunk]) -> None:
        own = layout_prompt(plain_text, self, self.layout_options)
        if [(c.tokens, c.multipliers) for c in own] != [(c.tokens, c.multipliers) for c in chunks]:
            raise LayoutMismatch(f"layout differs for '{plain_text[:60]}'")

    def _final_norm(self) -> torch.nn.Module:
        return getattr(self.model, "text_model", self.model).final_layer_norm

    def encode_chunks(
        self, tokens: Sequence[Sequence[int]], multipliers: Sequence[Sequence[float]], fixes: Sequence[Sequence[tuple[int, Any]]]
    ) -> torch.Tensor:
        """Encode a batch of 77-token chunks: B x 77 x C, emphasis applied over the batch as A1111 does."""
        ids = torch.tensor([list(t) for t in tokens], device=self._token_embedding.wrapped.weight.device)
        self._token_embedding.pending = [list(f) for f in fixes]
        try:
            out = self.model(input_ids=ids, output_hidden_states=self.clip_skip > 1)
        finally:
            self._token_embedding.pending = None
        if self.clip_skip > 1:
            z = self._final_norm()(out.hidden_states[-self.clip_skip])
        else:
            z = out.last_hidden_state
        if self.emphasis in ("Original", "No norm"):
            weights = torch.tensor([list(m) for m in multipliers], device=z.device, dtype=z.dtype)
            original_mean = z.mean()
            z = z * weights.reshape(weights.shape + (1,)).expand(z.shape)
            if self.emphasis == "Original":
                z = z * (original_mean / z.mean())
        return z

    def encode_chunk(self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]) -> torch.Tensor:
        return self.encode_chunks([tokens], [multipliers], [fixes])[0]

    def encode_prompt(self, text: str) -> torch.Tensor:
        """The whole prompt's conditioning (77k x C), chunk by chunk, as A1111 encodes a single prompt."""
        chunks = layout_prompt(text, self, self.layout_options)
        with torch.no_grad():
            return torch.cat([self.encode_chunk(c.tokens, c.multipliers, c.fixes) for c in chunks])
