"""modules/sd_hijack_clip.py: ``PromptChunkFix`` (l.24), ``FrozenCLIPEmbedderWithCustomWords`` with ``tokenize``
(l.339), ``tokenize_line(line) -> (chunks, token_count)`` (l.81), ``process_tokens(tokens, multipliers)`` (l.253,
reads ``hijack.fixes``; sd_hijack.py:340 ``EmbeddingsWithFixes`` takes ``vec[textual_inversion_key]`` from SDXL
embeddings: ``clip_l`` for CLIP-L, ``clip_g`` for OpenCLIP-G), ``forward(texts)`` (l.205: chunk i of every text
encoded together, then hstack).

The contract encodes with AlignIT's reference encoder, which follows the same rules; a real WebUI is exercised by
tests/test_a1111_integration.py."""

from collections import namedtuple
from types import SimpleNamespace

import torch

from alignit.hosts.hf_clip import HFClipEncoder
from alignit.layout import EmbeddingMatch, layout_prompt

from . import shared

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self, tokens, multipliers, fixes):
        self.tokens = tokens
        self.multipliers = multipliers
        self.fixes = fixes


class FrozenCLIPEmbedderWithCustomWords(torch.nn.Module):
    def __init__(self, model, tokenizer, hijack, textual_inversion_key="clip_l"):
        super().__init__()
        self.hijack = hijack
        self.textual_inversion_key = textual_inversion_key
        self.wrapped = SimpleNamespace(transformer=model, tokenizer=tokenizer)
        self.reference = HFClipEncoder(model, tokenizer)
        self.id_start = self.reference.id_start
        self.id_end = self.reference.id_end
        self.id_pad = self.id_end
        self.comma_token = self.reference.comma_token
        self.reference.find_embedding = self._find_embedding

    def _find_embedding(self, tokens, position):
        embedding, length = self.hijack.embedding_db.find_embedding_at_position(tokens, position)
        return None if embedding is None else EmbeddingMatch(embedding.vectors, length, embedding)

    def _sync_options(self):
        self.reference.emphasis = shared.opts.emphasis
        self.reference.clip_skip = shared.opts.CLIP_stop_at_last_layers
        self.reference.layout_options = type(self.reference.layout_options)(
            shared.opts.emphasis != "None", shared.opts.comma_padding_backtrack
        )

    def tokenize(self, texts):
        return self.reference.tokenize(texts)

    def tokenize_line(self, line):
        self._sync_options()
        chunks = layout_prompt(line, self.reference, self.reference.layout_options)
        result = [PromptChunk(c.tokens, c.multipliers, [PromptChunkFix(o, e) for o, e in c.fixes]) for c in chunks]
        return result, len(result) * 75

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        self._sync_options()
        fixes, self.hijack.fixes = self.hijack.fixes or [[]] * len(remade_batch_tokens), None
        key = self.textual_inversion_key
        vectors = [
            [(f.offset, f.embedding.vec[key] if isinstance(f.embedding.vec, dict) else f.embedding.vec) for f in chunk_fixes]
            for chunk_fixes in fixes
        ]
        return self.reference.encode_chunks(remade_batch_tokens, batch_multipliers, vectors)

    def forward(self, texts):
        batch_chunks = [self.tokenize_line(text)[0] for text in texts]
        count = max(len(chunks) for chunks in batch_chunks)
        empty = PromptChunk([self.id_start] + [self.id_end] * 76, [1.0] * 77, [])
        zs = []
        for i in range(count):
            batch = [chunks[i] if i < len(chunks) else empty for chunks in batch_chunks]
            self.hijack.fixes = [c.fixes for c in batch]
            zs.append(self.process_tokens([c.tokens for c in batch], [c.multipliers for c in batch]))
        return torch.hstack(zs)
