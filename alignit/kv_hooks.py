"""Forward hooks on a UNet's cross-attention ``to_k``/``to_v`` that run a ``KVRewriter`` for one sampling pass.

Used by the hosts whose UNet is a plain torch module: the ldm UNet A1111 runs and diffusers'
``UNet2DConditionModel``. Layers are named the ldm way in both (``input_blocks.1.1.transformer_blocks.0.attn2``),
whatever the module tree, so LoRA and Custom Diffusion keys of any scheme (``alignit.sources.names``) find them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch

from .kv import Delta, Key, KVRewriter, MarkedChunk, Project, Projection, is_linear
from .sources.names import attn2_projection

log = logging.getLogger("alignit")


def attn2_modules(unet: torch.nn.Module) -> dict[Key, torch.nn.Module]:
    """Every cross-attention to_k/to_v of an SD-layout UNet (ldm or diffusers names), by ldm ``(layer, proj)``."""
    found = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn2.to_k", "attn2.to_v")) and is_linear(module):
            found[attn2_projection(name) or (name[: -len(".to_k")], name[-1])] = module
    return found


def attn2_factors(unet: torch.nn.Module) -> dict[str, int]:
    """Every cross-attention layer of an ldm-layout UNet (A1111's, Forge's) by path, with how many times smaller than
    the latent its input is (each ``Downsample`` of the input blocks doubles it, each ``Upsample`` of the output blocks
    halves it after that block)."""
    found: dict[str, int] = {}
    factor = 1
    for part in ("input_blocks", "middle_block", "output_blocks"):
        blocks = getattr(unet, part)
        for index, block in enumerate(blocks if isinstance(blocks, torch.nn.ModuleList) else [blocks]):
            prefix = f"{part}.{index}" if isinstance(blocks, torch.nn.ModuleList) else part
            for name, _ in block.named_modules():
                if name.endswith("attn2"):
                    found[f"{prefix}.{name}"] = factor
            kinds = {type(module).__name__ for module in block.modules()}
            if "Downsample" in kinds and part == "input_blocks":
                factor *= 2
            if "Upsample" in kinds and part == "output_blocks":
                factor //= 2
    return found


def module_projection(modules: Mapping[Key, torch.nn.Module]) -> Project:
    """What each projection computes for some rows now (with whatever the host merged into it), without hooks."""

    def project(key: Key, rows: torch.Tensor) -> torch.Tensor:
        module = modules[key]
        return type(module).forward(module, rows)

    return project


class KVInjector:
    """Forward hooks on a UNet's ``attn2.to_k``/``to_v`` running a KVRewriter; a context, or call ``remove``.

    ``is_current`` lets the host retire hooks that outlived their generation (after an error): they then do
    nothing and remove themselves. ``reached`` holds the layers whose projection ran while the hooks were on.
    """

    def __init__(
        self,
        unet: torch.nn.Module,
        chunks: Sequence[MarkedChunk],
        weights: Sequence[Mapping[Key, Projection]],
        global_lora: Sequence[tuple[Key, Delta]] = (),
        is_current: Callable[[], bool] = lambda: True,
    ):
        modules = attn2_modules(unet)
        self.rewriter = KVRewriter(chunks, weights, global_lora, module_projection(modules))
        self.is_current = is_current
        self.error: str | None = None
        self.reached: set[Key] = set()
        # First among the projection's forward hooks: whoever else watches to_k/to_v (the attention maps) sees the
        # rewritten keys/values.
        self._handles = [
            modules[key].register_forward_hook(self._hook(key), prepend=True) for key in self.rewriter.layers if key in modules
        ]

    def _hook(self, key: Key):
        def hook(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
            if not self.is_current():
                self.remove()
                return None
            self.reached.add(key)
            try:
                return self.rewriter.rewrite(key, inputs[0], output)
            except Exception as error:  # a failure must cost the concept's K/V weights, not the generation
                log.exception("AlignIT: rewriting keys/values")
                self.error = f"{type(error).__name__}: {error}"
                self.remove()
                return None

        return hook

    def unmatched_layers(self) -> list[Key]:
        return self.rewriter.unmatched_layers()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.rewriter.release()

    @property
    def installed(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> KVInjector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
