"""A diffusers pipeline's own tokenizer(s) and text encoder(s) as AlignIT's ``TextEncoder``.

Rows are computed as the pipeline's ``encode_prompt`` computes them: SD 1.x/2.x take the last hidden state (with
CLIP skip: an earlier layer through the final LayerNorm); SDXL takes the penultimate hidden state of each encoder
(with CLIP skip: ``clip_skip`` layers further back) and concatenates them (768 + 1280 = 2048). Each encoder gets its
own tokenizer's ids, so SDXL's second encoder sees its padding token ``!`` (id 0) after the prompt's EOS, as in
``encode_prompt``.

diffusers has no prompt syntax: no emphasis, no ``BREAK``, one 77-token chunk; a longer prompt is truncated by the
pipeline (and by AlignIT the same way).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.utils.torch_utils import get_module_execution_device

from ...errors import ConceptError, LayoutMismatch, Unsupported
from ...layout import CHUNK_ROWS, PAD, Chunk, EmbeddingMatch, LayoutOptions

Handle = tuple[torch.Tensor, ...]
"""An embedding as ``encode_chunk`` takes it: its vectors (n x C) for each text encoder, in the pipeline's order."""


def text_encoders(pipe: Any) -> list[tuple[Any, Any]]:
    """The pipeline's (tokenizer, text encoder) pairs, as its ``encode_prompt`` uses them (an SDXL refiner has only
    the second)."""
    pairs = [
        (getattr(pipe, tokenizer, None), getattr(pipe, encoder, None))
        for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
    ]
    return [(tokenizer, encoder) for tokenizer, encoder in pairs if tokenizer is not None and encoder is not None]


@contextlib.contextmanager
def _vectors_at(text_model: Any, inserts: Sequence[tuple[int, torch.Tensor]]) -> Iterator[None]:
    """The token embedding's output with ``vectors`` written at rows ``position`` (cut at the final row) while the block
    runs: the values diffusers' ``load_textual_inversion`` would put in the embedding matrix, without adding tokens."""

    def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for position, vectors in inserts:
            count = min(output.shape[1] - position - 1, vectors.shape[0])
            output[:, position : position + count] = vectors[:count].to(output)
        return output

    handle = text_model.get_input_embeddings().register_forward_hook(hook) if inserts else None
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


class DiffusersEncoder:
    """Lays prompts out with the pipeline's first tokenizer, checks them against every tokenizer's own ids, and encodes
    p' through each text encoder exactly as ``encode_prompt`` encodes a prompt."""

    def __init__(self, pipe: Any, clip_skip: int | None = None):
        pairs = text_encoders(pipe)
        if not pairs:
            raise Unsupported(f"{type(pipe).__name__} has no CLIP tokenizer and text encoder")
        self.pipe = pipe
        self.tokenizers = [tokenizer for tokenizer, _ in pairs]
        self.text_models: list[Any] = [model for _, model in pairs]
        self.sdxl = hasattr(pipe, "text_encoder_2")
        self.clip_skip = clip_skip
        for tokenizer in self.tokenizers:
            if tokenizer.model_max_length != CHUNK_ROWS:
                raise Unsupported(
                    f"the tokenizer takes {tokenizer.model_max_length} tokens; AlignIT works on 77-token CLIP prompts"
                )
        first = self.tokenizers[0]
        self.id_start, self.id_end = first.bos_token_id, first.eos_token_id
        self.comma_token: int | None = None
        self.layout_options = LayoutOptions(parse_emphasis=False, comma_backtrack=0)
        self.widths = [model.config.hidden_size for model in self.text_models]

    def _converted(self, text: str, tokenizer: Any) -> str:
        """The text as ``encode_prompt`` tokenizes it: a multi-vector token loaded with ``load_textual_inversion``
        spelled out (``maybe_convert_prompt``)."""
        if isinstance(self.pipe, TextualInversionLoaderMixin):
            return self.pipe.maybe_convert_prompt(text, tokenizer)
        return text

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        tokenizer = self.tokenizers[0]
        converted = [self._converted(text, tokenizer) for text in texts]
        return [list(ids) for ids in tokenizer(converted, add_special_tokens=False, truncation=False).input_ids]

    def find_embedding(self, tokens: Sequence[int], position: int) -> EmbeddingMatch | None:
        return None  # embeddings loaded into the pipeline are tokens of its tokenizer

    def _ids(self, tokens: Sequence[int], tokenizer: Any) -> list[int]:
        """A chunk's ids for one tokenizer: its padding token after the first EOS (SDXL's second: ``!``)."""
        end = list(tokens).index(self.id_end, 1)
        return list(tokens[: end + 1]) + [tokenizer.pad_token_id] * (len(tokens) - end - 1)

    def check_layout(self, plain_text: str, chunks: Sequence[Chunk]) -> None:
        """The first chunk (the one diffusers encodes) against each tokenizer's padded, truncated ids; the tokens of
        every chunk against the untruncated ids."""
        ours = [token for chunk in chunks for token, tag in zip(chunk.tokens[1:-1], chunk.tags[1:-1]) if tag != PAD]
        for tokenizer in self.tokenizers:
            text = self._converted(plain_text, tokenizer)
            own = tokenizer(text, padding="max_length", max_length=CHUNK_ROWS, truncation=True).input_ids
            whole = tokenizer(text, add_special_tokens=False, truncation=False).input_ids
            if own != self._ids(chunks[0].tokens, tokenizer) or whole != ours:
                raise LayoutMismatch(f"AlignIT lays out '{plain_text[:60]}' differently from the pipeline's tokenizer")

    def embedding_handle(self, name: str, vectors: torch.Tensor) -> Handle:
        if len(self.text_models) > 1:
            raise ConceptError(f"'{name}' holds one text encoder's vectors; an SDXL model needs clip_l and clip_g")
        return (vectors,)

    def _rows(self, model: Any, output: Any) -> torch.Tensor:
        if self.sdxl:
            return output.hidden_states[-2 if self.clip_skip is None else -(self.clip_skip + 2)]
        if self.clip_skip is None:
            return output[0]
        final_norm = getattr(model, "text_model", model).final_layer_norm  # transformers 5 has no text_model level
        return final_norm(output.hidden_states[-(self.clip_skip + 1)])

    def encode_chunk(self, tokens: Sequence[int], multipliers: Sequence[float], fixes: Sequence[tuple[int, Any]]) -> torch.Tensor:
        """77 rows of p' (no emphasis: ``multipliers`` are all 1), embedding vectors written at ``fixes``."""
        rows = []
        for index, (tokenizer, model) in enumerate(zip(self.tokenizers, self.text_models)):
            device = get_module_execution_device(model)
            ids = torch.tensor([self._ids(tokens, tokenizer)], device=device)
            mask = None
            if getattr(model.config, "use_attention_mask", False):
                mask = (torch.arange(len(tokens), device=device) <= list(tokens).index(self.id_end, 1)).long()[None]
            inserts = [(offset + 1, handle[index]) for offset, handle in fixes]
            with torch.no_grad(), _vectors_at(model, inserts):
                # as encode_prompt calls it (transformers installs hooks on a model the first time it returns hidden states)
                output = model(ids, attention_mask=mask, output_hidden_states=self.sdxl or self.clip_skip is not None)
            rows.append(self._rows(model, output)[0])
        return torch.cat(rows, dim=-1)
