"""Forge's modules/ui_extra_networks_textual_inversion.py: ``embedding_db`` (l.9-11), an ``EmbeddingDatabase`` of the
embeddings folder loaded when the module is imported, without a model (``sync_with_sd_model=False``), for the Textual
Inversion page."""

from .sd_hijack import EmbeddingDatabase

embedding_db = EmbeddingDatabase()
