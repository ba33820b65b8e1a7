"""modules/sd_hijack_open_clip.py: ``FrozenOpenCLIPEmbedder2WithCustomWords`` (l.41-71), SDXL's OpenCLIP-G prompt
encoder: the ``FrozenCLIPEmbedderWithCustomWordsBase`` chunking and ``process_tokens`` over sgm's
``FrozenOpenCLIPEmbedder2`` (``wrapped``), whose ``model`` is open_clip's CLIP without the vision tower:
``wrapped.model.transformer`` is the text tower's ``Transformer``. Embeddings take their ``clip_g`` vectors. (The real
one pads with 0 after the end token, ``id_pad``, which AlignIT leaves to ``process_tokens``.)"""

from types import SimpleNamespace

from .sd_hijack_clip import FrozenCLIPEmbedderWithCustomWords


class FrozenOpenCLIPEmbedder2WithCustomWords(FrozenCLIPEmbedderWithCustomWords):
    def __init__(self, model, tokenizer, hijack):
        super().__init__(model, tokenizer, hijack, "clip_g")
        self.wrapped = SimpleNamespace(model=model, tokenizer=tokenizer, layer=model.layer)
