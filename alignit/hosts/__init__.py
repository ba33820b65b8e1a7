"""Host adapters: each one shows AlignIT a WebUI's (or library's) text encoder, embeddings and conditioning."""
