"""What A1111's ``FrozenCLIPEmbedderWithCustomWords`` and Forge's ``ClassicTextProcessingEngine`` share: 77-token
chunks laid out by ``tokenize_line``, ``process_tokens`` encoding a batch of chunks with embedding vectors written
over their placeholder rows (``vec[key]`` for SDXL embeddings), and the call encoding chunk i of every text together
then stacking the chunks along the rows.

Both contracts encode with AlignIT's reference encoder, which follows the same rules; the real WebUIs are exercised
by tests/test_a1111_integration.py and tests/test_forge_integration.py."""

from collections import namedtuple
from types import SimpleNamespace

import torch
from hf_clip import HFClipEncoder

from alignit.layout import EmbeddingMatch, LayoutOptions, layout_prompt

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])


class PromptChunk:
    def __init__(self, tokens, multipliers, fixes):
        self.tokens = tokens
        self.multipliers = multipliers
        self.fixes = fixes


class ContractClip(torch.nn.Module):
    """Subclasses say where the embedding database, the pending fixes and the options live."""

    def __init__(self, model, tokenizer, database, textual_inversion_key):
        super().__init__()
        self.database = database
        self.textual_inversion_key = textual_inversion_key
        self.wrapped = SimpleNamespace(transformer=model, tokenizer=tokenizer)
        self.reference = HFClipEncoder(model, tokenizer)
        self.id_start = self.reference.id_start
        self.id_end = self.reference.id_end
        self.id_pad = self.id_end
        self.comma_token = self.reference.comma_token
        self.reference.find_embedding = self._find_embedding

    def _find_embedding(self, tokens, position):
        embedding, length = self.database.find_embedding_at_position(tokens, position)
        return None if embedding is None else EmbeddingMatch(embedding.vectors, length, embedding)

    def options(self):
        """(emphasis name, CLIP skip, comma backtrack)."""
        raise NotImplementedError

    def take_fixes(self):
        """The pending fixes of the batch about to be encoded, cleared as the WebUI clears them."""
        raise NotImplementedError

    def _sync_options(self):
        emphasis, clip_skip, backtrack = self.options()
        self.reference.emphasis = emphasis
        self.reference.clip_skip = clip_skip
        self.reference.layout_options = LayoutOptions(emphasis != "None", backtrack)

    def tokenize(self, texts):
        return self.reference.tokenize(texts)

    def tokenize_line(self, line):
        self._sync_options()
        chunks = layout_prompt(line, self.reference, self.reference.layout_options)
        result = [PromptChunk(c.tokens, c.multipliers, [PromptChunkFix(o, e) for o, e in c.fixes]) for c in chunks]
        return result, len(result) * 75

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        self._sync_options()
        fixes = self.take_fixes() or [[]] * len(remade_batch_tokens)
        key = self.textual_inversion_key
        vectors = [
            [(f.offset, f.embedding.vec[key] if isinstance(f.embedding.vec, dict) else f.embedding.vec) for f in chunk_fixes]
            for chunk_fixes in fixes
        ]
        return self.reference.encode_chunks(remade_batch_tokens, batch_multipliers, vectors)

    def set_fixes(self, fixes):
        raise NotImplementedError

    def forward(self, texts):
        batch_chunks = [self.tokenize_line(text)[0] for text in texts]
        count = max(len(chunks) for chunks in batch_chunks)
        empty = PromptChunk([self.id_start] + [self.id_end] * 76, [1.0] * 77, [])
        zs = []
        for i in range(count):
            batch = [chunks[i] if i < len(chunks) else empty for chunks in batch_chunks]
            self.set_fixes([c.fixes for c in batch])
            zs.append(self.process_tokens([c.tokens for c in batch], [c.multipliers for c in batch]))
        return torch.hstack(zs)
