"""modules/sd_hijack.py ``model_hijack`` (fixes, embedding_db, comments) and the textual-inversion
``EmbeddingDatabase`` it holds (textual_inversion/textual_inversion.py:111-257): ``word_embeddings``,
``skipped_embeddings``, ``ids_lookup`` and ``find_embedding_at_position(tokens, offset) -> (embedding, length)``."""

from types import SimpleNamespace


class Embedding:
    """textual_inversion.py:39: ``vec``, ``name``, ``vectors``, ``shape``."""

    def __init__(self, vec, name):
        self.vec = vec
        self.name = name
        first = next(iter(vec.values())) if isinstance(vec, dict) else vec
        self.vectors = first.shape[0]
        self.shape = first.shape[-1]


class EmbeddingDatabase:
    def __init__(self):
        self.word_embeddings = {}
        self.skipped_embeddings = {}
        self.ids_lookup = {}

    def register_embedding(self, embedding, ids):
        self.word_embeddings[embedding.name] = embedding
        entries = self.ids_lookup.setdefault(ids[0], [])
        entries.append((ids, embedding))
        entries.sort(key=lambda e: -len(e[0]))

    def find_embedding_at_position(self, tokens, offset):
        for ids, embedding in self.ids_lookup.get(tokens[offset], []):
            if list(tokens[offset : offset + len(ids)]) == ids:
                return embedding, len(ids)
        return None, None


model_hijack = SimpleNamespace(fixes=None, embedding_db=EmbeddingDatabase(), comments=[], extra_generation_params={})
