"""The plain customized pipeline, the ecosystem's way, for comparison with AlignIT (trigger kept, AlignIT off).

An embedding is loaded with diffusers' ``load_textual_inversion`` (on SDXL into both text encoders), a LoRA with
``load_lora_weights`` (UNet and text encoders, its weight folded into its up factors), a Custom Diffusion delta as
diffusers' ``CustomDiffusionAttnProcessor2_0`` on the cross-attention layers it trains (its modifier tokens with
``load_textual_inversion``). Each is given the tensors AlignIT's safe loader read, never the file, and is taken off
again when the block ends: tokens unloaded, the adapter deleted (the PEFT layers unloaded when no adapter is left),
the earlier processors set back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from diffusers.models.attention_processor import CustomDiffusionAttnProcessor2_0

from ...concepts import Concept, SourceKind
from ...sources.custom_diffusion import CustomDiffusionDelta
from ...sources.embeddings import Embedding
from ...sources.names import attn2_projection
from .encoder import DiffusersEncoder, text_encoders
from .sources import SourceFiles, embedding_handle

_UP_FACTOR = re.compile(r"(lora_up|lora_B(\.default)?|lora\.up|_lora\.up)\.weight$")


@contextlib.contextmanager
def _tokens(pipe: Any, token: str, vectors: Sequence[torch.Tensor]) -> Iterator[None]:
    """``token`` loaded with ``load_textual_inversion`` into each text encoder (its vectors in the pipeline's order)."""
    pairs = text_encoders(pipe)[: len(vectors)]
    loaded = []
    try:
        for (tokenizer, text_encoder), vector in zip(pairs, vectors):
            pipe.load_textual_inversion(vector, token=token, tokenizer=tokenizer, text_encoder=text_encoder)
            loaded.append((tokenizer, text_encoder))
        yield
    finally:
        for tokenizer, text_encoder in loaded:
            pipe.unload_textual_inversion(token, tokenizer=tokenizer, text_encoder=text_encoder)


def _embedding(pipe: Any, token: str, embedding: Embedding) -> contextlib.AbstractContextManager[None]:
    return _tokens(pipe, token, embedding_handle(embedding, DiffusersEncoder(pipe)))


@contextlib.contextmanager
def _lora(pipe: Any, files: SourceFiles, adapter: str) -> Iterator[None]:
    state = {key: value * files.lora_weight if _UP_FACTOR.search(key) else value for key, value in files.lora_tensors.items()}
    pipe.load_lora_weights(state, adapter_name=adapter)
    try:
        yield
    finally:
        pipe.delete_adapters(adapter)
        if not any(pipe.get_list_adapters().values()):
            pipe.unload_lora_weights()


@contextlib.contextmanager
def _custom_diffusion(pipe: Any, delta: CustomDiffusionDelta) -> Iterator[None]:
    earlier: dict[Any, Any] = {}
    try:
        modules: list[tuple[str, Any]] = list(pipe.unet.named_modules())
        for name, module in modules:
            projection = attn2_projection(f"{name}.to_k") if name.endswith("attn2") else None
            weights = [delta.kv.get((projection[0], proj)) for proj in "kv"] if projection else [None, None]
            if not any(weights):
                continue
            own = (module.to_k.weight, module.to_v.weight)
            k, v = (w.weight if w is not None else o.detach().float() for w, o in zip(weights, own))
            processor = CustomDiffusionAttnProcessor2_0(
                train_kv=True, train_q_out=False, hidden_size=k.shape[0], cross_attention_dim=k.shape[1]
            )
            with torch.no_grad():
                processor.to_k_custom_diffusion.weight.copy_(k)
                processor.to_v_custom_diffusion.weight.copy_(v)
            earlier[module] = module.processor
            module.set_processor(processor.to(module.to_k.weight.device, module.to_k.weight.dtype))
        with contextlib.ExitStack() as stack:
            for token, vectors in delta.modifier_tokens.items():
                stack.enter_context(_tokens(pipe, token, [vectors]))
            yield
    finally:
        for module, processor in earlier.items():
            module.set_processor(processor)


@contextlib.contextmanager
def customized(pipe: Any, concepts: Sequence[tuple[Concept, SourceFiles]]) -> Iterator[None]:
    """The pipeline customized with every concept's source while the block runs; everything taken off after."""
    with contextlib.ExitStack() as stack:
        for index, (concept, files) in enumerate(concepts):
            if files.kind is SourceKind.LORA:
                stack.enter_context(_lora(pipe, files, f"alignit_{index}"))
            elif files.kind is SourceKind.CUSTOM_DIFFUSION and files.custom_diffusion is not None:
                stack.enter_context(_custom_diffusion(pipe, files.custom_diffusion))
            elif files.embedding is not None:
                stack.enter_context(_embedding(pipe, concept.trigger, files.embedding))
        yield
