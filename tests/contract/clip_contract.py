"""What A1111's ``FrozenCLIPEmbedderWithCustomWords`` and Forge's ``ClassicTextProcessingEngine`` share, written from
their code (A1111 ``modules/sd_hijack_clip.py``, ``sd_hijack.py``, ``sd_emphasis.py``; Forge
``backend/text_processing/classic_engine.py``, ``emphasis.py``): ``tokenize_line`` laying a prompt out in 77-token
chunks, ``process_tokens`` encoding a batch of chunks with embedding vectors written over their placeholder rows
(``vec[key]`` for SDXL embeddings) and emphasis applied, and the call encoding chunk i of every text together then
stacking the chunks along the rows.

Independent of AlignIT: ``tests/test_golden_layouts.py`` checks this ``tokenize_line`` against the layouts recorded
from the real WebUIs, so it cannot drift from them; the real WebUIs are exercised end to end by
tests/test_a1111_integration.py and tests/test_forge_integration.py."""

from collections import namedtuple
from types import SimpleNamespace

import torch

PromptChunkFix = namedtuple("PromptChunkFix", ["offset", "embedding"])
CHUNK_LENGTH = 75


class PromptChunk:
    def __init__(self, tokens=None, multipliers=None, fixes=None):
        self.tokens = tokens or []
        self.multipliers = multipliers or []
        self.fixes = fixes or []


class EmbeddingsWithFixes(torch.nn.Module):
    """sd_hijack.py:340-366 (classic_engine.py:23-50): the token embedding writes the pending embeddings' vectors after
    each fix's offset (BOS comes first), cut at the chunk's end, then forgets them."""

    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped
        self.pending = None  # per batch item: [(offset, vectors)]

    @property
    def weight(self):
        """The token embedding's weight (classic_engine.py:29 exposes it too), under any other wrapper."""
        inner = self.wrapped
        while not isinstance(inner, torch.nn.Embedding):
            inner = inner.wrapped
        return inner.weight

    def forward(self, input_ids):
        batch_fixes, self.pending = self.pending, None
        embeds = self.wrapped(input_ids)
        if not batch_fixes or not any(batch_fixes):
            return embeds
        rows = []
        for fixes, tensor in zip(batch_fixes, embeds):
            for offset, vec in fixes:
                count = min(tensor.shape[0] - offset - 1, vec.shape[0])
                tensor = torch.cat([tensor[: offset + 1], vec[:count].to(tensor), tensor[offset + 1 + count :]])
            rows.append(tensor)
        return torch.stack(rows)


def _fixes_layer(model):
    """The model's ``EmbeddingsWithFixes``, installed once (a test's own encoder may have wrapped the layer first)."""
    layer = model.get_input_embeddings()
    inner = layer
    while inner is not None and not isinstance(inner, EmbeddingsWithFixes):
        inner = getattr(inner, "wrapped", None)
    if inner is None:
        inner = EmbeddingsWithFixes(layer)
        model.set_input_embeddings(inner)
    return inner


class ContractClip(torch.nn.Module):
    """Subclasses say how a line is parsed into attention fragments, where the embedding database, the pending fixes
    and the options live."""

    def __init__(self, model, tokenizer, database, textual_inversion_key):
        super().__init__()
        self.database = database
        self.textual_inversion_key = textual_inversion_key
        self.model = model
        self.wrapped = SimpleNamespace(transformer=model, tokenizer=tokenizer)
        vocab = tokenizer.get_vocab()
        self.id_start = tokenizer.bos_token_id  # sd_hijack_clip.py:334-336
        self.id_end = tokenizer.eos_token_id
        self.id_pad = self.id_end
        self.comma_token = vocab.get(",</w>", None)  # l.315
        self._fixes = _fixes_layer(model) if model is not None else None

    def options(self):
        """(emphasis name, CLIP skip, comma backtrack)."""
        raise NotImplementedError

    def parse(self, line):
        """The attention fragments of ``line`` (``[[text, weight]]``; ``["BREAK", -1]`` for a BREAK)."""
        raise NotImplementedError

    def embedding_database(self):
        """The embedding database tokenization reads."""
        return self.database

    def take_fixes(self):
        """The pending fixes of the batch about to be encoded, cleared as the WebUI clears them."""
        raise NotImplementedError

    def set_fixes(self, fixes):
        raise NotImplementedError

    def tokenize(self, texts):
        """sd_hijack_clip.py:339-342 (classic_engine.py:119-122)."""
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line):
        """sd_hijack_clip.py:81-174 (classic_engine.py:150-232): ``(chunks, token count)``.

        Tokens fill chunks of 75 between BOS and EOS, padded with EOS. ``BREAK`` closes the chunk. When a chunk is
        full and the next token is not a comma, the tokens after the chunk's last comma move to the next chunk if that
        comma is at most ``comma_padding_backtrack`` tokens from the end (0: never); the moved tokens leave their
        embedding fixes behind. An embedding found at a token puts ``vectors`` placeholder tokens (id 0) with the
        fragment's weight and a fix at their offset; it moves whole to the next chunk when it does not fit."""
        backtrack = self.options()[2]
        parsed = self.parse(line)
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks = []
        chunk = PromptChunk()
        token_count = 0
        last_comma = -1

        def close(is_last=False):
            nonlocal chunk, last_comma, token_count
            token_count += len(chunk.tokens) if is_last else CHUNK_LENGTH
            padding = max(0, CHUNK_LENGTH - len(chunk.tokens))
            chunk.tokens = [self.id_start] + chunk.tokens + [self.id_end] * padding + [self.id_end]
            chunk.multipliers = [1.0] + chunk.multipliers + [1.0] * padding + [1.0]
            chunks.append(chunk)
            chunk = PromptChunk()
            last_comma = -1

        for tokens, (text, weight) in zip(tokenized, parsed):
            if text == "BREAK" and weight == -1:
                close()
                continue
            position = 0
            while position < len(tokens):
                token = tokens[position]
                if token == self.comma_token:
                    last_comma = len(chunk.tokens)
                elif (
                    backtrack
                    and len(chunk.tokens) == CHUNK_LENGTH
                    and last_comma != -1
                    and CHUNK_LENGTH - last_comma <= backtrack
                ):
                    cut = last_comma + 1
                    moved = chunk.tokens[cut:], chunk.multipliers[cut:]
                    chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                    close()
                    chunk.tokens, chunk.multipliers = moved
                if len(chunk.tokens) == CHUNK_LENGTH:
                    close()
                embedding, length = self.embedding_database().find_embedding_at_position(tokens, position)
                if embedding is None:
                    chunk.tokens.append(token)
                    chunk.multipliers.append(weight)
                    position += 1
                    continue
                vectors = int(embedding.vectors)
                if len(chunk.tokens) + vectors > CHUNK_LENGTH:
                    close()
                chunk.fixes.append(PromptChunkFix(len(chunk.tokens), embedding))
                chunk.tokens += [0] * vectors
                chunk.multipliers += [weight] * vectors
                position += length
        if chunk.tokens or not chunks:
            close(is_last=True)
        return chunks, token_count

    def encode_with_transformers(self, tokens):
        """sd_hijack_clip.py:357-366: the last layer, or with CLIP skip n the n-th from the end through the final norm
        (classic_engine.py:124-148 computes the same for SD1.x)."""
        clip_skip = self.options()[1]
        out = self.model(input_ids=tokens, output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            return getattr(self.model, "text_model", self.model).final_layer_norm(out.hidden_states[-clip_skip])
        return out.last_hidden_state

    def process_tokens(self, remade_batch_tokens, batch_multipliers):
        """sd_hijack_clip.py:253-285 (classic_engine.py:297-318) with the emphasis of sd_emphasis.py: "Original"
        scales each row by its weight and restores the chunk batch's mean, "No norm" only scales, "Ignore" and
        "None" leave the rows as they are."""
        emphasis = self.options()[0]
        fixes = self.take_fixes() or [[]] * len(remade_batch_tokens)
        key = self.textual_inversion_key
        self._fixes.pending = [
            [(f.offset, f.embedding.vec[key] if isinstance(f.embedding.vec, dict) else f.embedding.vec) for f in chunk_fixes]
            for chunk_fixes in fixes
        ]
        tokens = torch.asarray(remade_batch_tokens, device=self._fixes.weight.device)
        try:
            z = self.encode_with_transformers(tokens)
        finally:
            self._fixes.pending = None
        if emphasis in ("Original", "No norm"):
            multipliers = torch.asarray(batch_multipliers).to(z)
            original_mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            if emphasis == "Original":
                z = z * (original_mean / z.mean())
        return z

    def forward(self, texts):
        """sd_hijack_clip.py:199-251: chunk i of every text encoded together (an empty chunk for shorter texts)."""
        batch_chunks = [self.tokenize_line(text)[0] for text in texts]
        count = max(len(chunks) for chunks in batch_chunks)
        empty = PromptChunk([self.id_start] + [self.id_end] * 76, [1.0] * 77, [])
        zs = []
        for i in range(count):
            batch = [chunks[i] if i < len(chunks) else empty for chunks in batch_chunks]
            self.set_fixes([c.fixes for c in batch])
            zs.append(self.process_tokens([c.tokens for c in batch], [c.multipliers for c in batch]))
        return torch.hstack(zs)
