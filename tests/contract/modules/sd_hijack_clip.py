"""modules/sd_hijack_clip.py: ``PromptChunkFix`` (l.24), ``FrozenCLIPEmbedderWithCustomWords`` with ``tokenize``
(l.339), ``tokenize_line(line) -> (chunks, token_count)`` (l.81; the line parsed by ``prompt_parser`` unless
the emphasis is "None", l.88-91), ``process_tokens(tokens, multipliers)`` (l.253,
reads ``hijack.fixes``; sd_hijack.py:340 ``EmbeddingsWithFixes`` takes ``vec[textual_inversion_key]`` from SDXL
embeddings: ``clip_l`` for CLIP-L, ``clip_g`` for OpenCLIP-G), ``forward(texts)`` (l.205: chunk i of every text
encoded together, then hstack). Options from ``shared.opts`` (emphasis, CLIP skip, comma backtrack)."""

from clip_contract import ContractClip, PromptChunkFix

from . import prompt_parser, shared

__all__ = ["FrozenCLIPEmbedderWithCustomWords", "PromptChunkFix"]


class FrozenCLIPEmbedderWithCustomWords(ContractClip):
    def __init__(self, model, tokenizer, hijack, textual_inversion_key="clip_l"):
        super().__init__(model, tokenizer, hijack.embedding_db, textual_inversion_key)
        self.hijack = hijack

    def embedding_database(self):
        """sd_hijack_clip.py:154: ``self.hijack.embedding_db``, read at each tokenization (a model built before the
        database was replaced still finds the new one)."""
        return self.hijack.embedding_db

    def options(self):
        opts = shared.opts
        return opts.emphasis, opts.CLIP_stop_at_last_layers, opts.comma_padding_backtrack

    def parse(self, line):
        return prompt_parser.parse_prompt_attention(line) if shared.opts.emphasis != "None" else [[line, 1.0]]

    def take_fixes(self):
        fixes, self.hijack.fixes = self.hijack.fixes, None
        return fixes

    def set_fixes(self, fixes):
        self.hijack.fixes = fixes
