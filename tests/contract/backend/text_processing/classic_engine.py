"""backend/text_processing/classic_engine.py: ``PromptChunkFix`` (l.12), ``ClassicTextProcessingEngine`` with an
``EmbeddingDatabase`` of its own in ``embeddings`` (textual_inversion.py 111-226: ``word_embeddings``,
``skipped_embeddings``, ``find_embedding_at_position``, and ``fixes``, which ``CLIPEmbeddingForTextualInversion``
(l.23-51) takes and clears, reading ``vec[embedding_key]`` from SDXL embeddings), ``embedding_key``,
``text_encoder.transformer`` (the transformers CLIP model), ``emphasis`` (set from ``opts.emphasis`` by ``__call__``,
l.253), ``clip_skip``, ``tokenize`` (l.119), ``tokenize_line`` (l.150-232: the line parsed by ``parsing`` with the
engine's emphasis, l.151; comma backtrack fixed at 20, l.191),
``process_tokens`` (l.297) and ``__call__(texts)`` (l.252-295, chunks hstacked)."""

from types import SimpleNamespace

from clip_contract import ContractClip, PromptChunkFix
from modules import shared
from modules.sd_hijack import EmbeddingDatabase

from . import emphasis, parsing

__all__ = ["ClassicTextProcessingEngine", "PromptChunkFix"]


class ClassicTextProcessingEngine(ContractClip):
    def __init__(self, model, tokenizer, embedding_key="clip_l", clip_skip=1):
        database = EmbeddingDatabase()
        database.fixes = []
        super().__init__(model, tokenizer, database, embedding_key)
        self.embeddings = database
        self.embedding_key = embedding_key
        self.text_encoder = SimpleNamespace(transformer=model)
        self.clip_skip = clip_skip
        self.emphasis = emphasis.get_current_option(shared.opts.emphasis)()

    def options(self):
        return self.emphasis.name, self.clip_skip, 20

    def parse(self, line):
        return parsing.parse_prompt_attention(line, self.emphasis.name)

    def take_fixes(self):
        fixes, self.embeddings.fixes = self.embeddings.fixes, None
        return fixes

    def set_fixes(self, fixes):
        self.embeddings.fixes = fixes

    def forward(self, texts):
        self.emphasis = emphasis.get_current_option(shared.opts.emphasis)()
        return super().forward(texts)
