"""The order in which Forge (main dfdcbab6) runs a generation, driven against the contract in tests/contract.

Mirrors modules/processing.py: ``process`` (907) → per batch: ``forge_objects`` reset to the original ones (937),
prompts sliced, ``before_process_batch`` (952), extra networks parsed and activated (954-955; the Lora extension
clones the UNet and CLIP patchers with the LoRA's patches, merged into the weights when the model loads: here
``webui_flow.loras_applied``), ``forge_objects = forge_objects_after_applying_lora`` (957), ``process_batch`` (960),
``setup_conds`` (962, caches of three entries, 442-488); txt2img sampling (1373-1381): ``forge_objects`` reset to
``forge_objects_after_applying_lora``, ``process_before_every_sampling(c=…)``, then the sampler runs
``forge_objects.unet``; hires: extra networks activated again (1506), ``calculate_hr_conds`` (1509),
``process_before_every_sampling`` (1510), a reset (1518), ``process_before_every_sampling`` again (1522); then
``postprocess_batch``.

The sampler (backend/sampling/sampling_function.py 160-257) batches uncond and cond chunks of ``batch_size`` rows,
uncond first, with ``cond_or_uncond`` ([1, 0]) in ``transformer_options``; contexts of unequal lengths are tiled to
their LCM (condition.py 45-72). The ldm UNet's cross-attention runs as Forge's ``BasicTransformerBlock._forward``
(backend/nn/unet.py 236-259): the ``attn2_patch`` list on ``(n, context, value)``, then the replace patch of
``(block, id, transformer index)`` or ``(block, id)`` on the projected ``q, k, v``; the options carry the UNet
input's shape (``original_shape``, unet.py 697)."""

from __future__ import annotations

import contextlib
import math
import re
from types import SimpleNamespace

import torch
import webui_flow
from backend import attention
from backend.patcher.base import ModelPatcher
from backend.text_processing.classic_engine import ClassicTextProcessingEngine
from modules import prompt_parser, shared
from webui_flow import Processing, crossattn

from alignit.hosts.webui.forge import ForgeHost

HOST = ForgeHost()
_ATTN2 = re.compile(r"^(?:(input|output)_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.attn2$")


class KModel(torch.nn.Module):
    """backend/modules/k_model.py: the patcher's ``model``, holding ``diffusion_model``."""

    def __init__(self, unet):
        super().__init__()
        self.diffusion_model = unet


class ForgeObjects(SimpleNamespace):
    """backend/diffusion_engine/base.py ``ForgeObjects`` with ``shallow_copy``."""

    def shallow_copy(self):
        return ForgeObjects(**vars(self))


class NestedCLIPTextModel(torch.nn.Module):
    """A CLIP text model as Forge holds it in ``clip_l.transformer``: transformers 4.46.1 (Forge's pin) nests the
    layers under ``text_model``, which Forge's LoRA key maps name (``clip_l.transformer.text_model.encoder…``); the
    transformers these tests run has them at the top."""

    def __init__(self, model):
        super().__init__()
        self.text_model = model
        self.config = model.config


class FakeForgeModel:
    """``shared.sd_model`` of an SD1.5 checkpoint in Forge (backend/diffusion_engine/sd15.py): the classic text
    engine, ``forge_objects`` (unet, clip: ``cond_stage_model`` holds ``clip_l.transformer``), ``set_clip_skip``,
    ``get_learned_conditioning``."""

    is_sd1, is_sd2, is_sdxl, is_sd3 = True, False, False, False
    engine_names = {"clip_l": "text_processing_engine"}

    def __init__(self, text_models: dict, tokenizer, unet):
        clip_model = torch.nn.ModuleDict({key: torch.nn.Module() for key in text_models})
        for key, text_model in text_models.items():
            clip_model[key].transformer = NestedCLIPTextModel(text_model)
            engine = ClassicTextProcessingEngine(text_model, tokenizer, key)
            engine.text_encoder.transformer = clip_model[key].transformer
            setattr(self, self.engine_names[key], engine)
        clip = SimpleNamespace(patcher=ModelPatcher(clip_model), cond_stage_model=clip_model)
        self.unet = unet
        self.forge_objects = ForgeObjects(unet=ModelPatcher(KModel(unet)), clip=clip)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()

    def engines(self):
        return [getattr(self, name) for name in self.engine_names.values()]

    def set_clip_skip(self, clip_skip):
        for engine in self.engines():
            engine.clip_skip = clip_skip

    def get_learned_conditioning(self, texts):
        with torch.inference_mode():  # sd15.py:63, sdxl.py:85: @torch.inference_mode()
            return self.text_processing_engine(texts)


class FakeForgeSDXLModel(FakeForgeModel):
    """backend/diffusion_engine/sdxl.py 85-121: ``crossattn`` = CLIP-L ‖ OpenCLIP-G rows, ``vector`` = the pooled
    OpenCLIP-G row (here the EOS row of the first chunk) and the size embeddings (zeros)."""

    is_sd1, is_sdxl = False, True
    engine_names = {"clip_l": "text_processing_engine_l", "clip_g": "text_processing_engine_g"}

    def get_learned_conditioning(self, texts):
        with torch.inference_mode():
            rows_l, rows_g = self.text_processing_engine_l(texts), self.text_processing_engine_g(texts)
        vector = torch.cat([rows_g[:, 76], torch.zeros(rows_g.shape[0], 8)], dim=-1)
        return {"crossattn": torch.cat([rows_l, rows_g], dim=-1), "vector": vector}


def _forge_attn2(module, block, index, transformer_options, x, context=None, mask=None):
    """backend/nn/unet.py 236-259 for one ldm ``CrossAttention``, which attends as Forge's own does."""
    patches = transformer_options.get("patches", {})
    replace = transformer_options.get("patches_replace", {}).get("attn2", {})
    extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
    extra |= {"block": block, "block_index": index, "n_heads": module.heads, "dim_head": module.to_q.out_features // module.heads}
    n, value = x, None
    if "attn2_patch" in patches:
        value = context
        for patch in patches["attn2_patch"]:
            n, context, value = patch(n, context, value, extra)
    key = (block[0], block[1], index) if (block[0], block[1], index) in replace else block
    value = context if value is None else value
    q, k, v = module.to_q(n), module.to_k(context), module.to_v(value)
    if key not in replace:  # Forge's own CrossAttention.forward (unet.py 145-155)
        return module.to_out(attention.attention_function(q, k, v, module.heads))
    return module.to_out(replace[key](q, k, v, extra))


@contextlib.contextmanager
def forge_attention(unet, transformer_options):
    """The ldm UNet's cross-attention layers run with Forge's patch semantics while the block runs."""
    swapped = []
    for name, module in unet.named_modules():
        match = _ATTN2.match(name)
        if match:
            kind, number, index = match.groups()
            block = (kind or "middle", int(number or 0))
            module.forward = lambda x, context=None, mask=None, m=module, b=block, i=int(index): _forge_attn2(
                m, b, i, transformer_options, x, context, mask
            )
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


class ForgeProcessing(Processing):
    """Processing with Forge's three-entry caches and Forge's sampler batching."""

    cached_c = [None, None, None]
    cached_uc = [None, None, None]
    cached_hr_c = [None, None, None]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_options: list[dict] = []

    @property
    def sd_model(self):
        return shared.sd_model

    def sample(self, c, steps):
        """Per step: the UNet on uncond ‖ cond (tiled to their LCM), with the current ``forge_objects.unet``."""
        outputs = []
        patcher = self.sd_model.forge_objects.unet
        for step in range(steps):
            if step == self.fail_at_step:
                raise RuntimeError("sampling failed")
            _, cond = prompt_parser.reconstruct_multicond_batch(c, step)
            cond = crossattn(cond)
            uncond = crossattn(prompt_parser.reconstruct_cond_batch(self.uc, step))
            length = math.lcm(cond.shape[1], uncond.shape[1])
            context = torch.cat([uncond.repeat(1, length // uncond.shape[1], 1), cond.repeat(1, length // cond.shape[1], 1)])
            x = torch.randn(context.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(step))
            options = dict(patcher.model_options["transformer_options"], cond_or_uncond=[1, 0], original_shape=list(x.shape))
            self.seen_options.append(options)
            with torch.inference_mode(), forge_attention(patcher.model.diffusion_model, options):  # as Forge samples
                outputs.append(patcher.model.diffusion_model(x, torch.full((context.shape[0],), 500), context=context))
            outputs.append(cond)
        self.sampled.append(outputs)


class ForgeOrder(webui_flow.Order):
    """Forge's departures: ``forge_objects`` resets (processing.py 937, 957, 1373, 1518), two hooks calls per hires
    pass (1510, 1522), and the built-in extensions' hooks running before AlignIT's (``earlier``)."""

    host = HOST
    hires_calls = 2

    def __init__(self, earlier=()):
        self.earlier = list(earlier)

    def batch_start(self, p) -> None:
        p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()

    def networks_activated(self, p) -> None:
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()

    def sampling_call(self, p, hires: bool, call: int) -> None:
        if not hires or call == 1:
            p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        for hook in self.earlier:
            hook(p)


def generate(p: ForgeProcessing, script_args=None, earlier=()) -> ForgeProcessing:
    """One txt2img run in Forge's order; ``earlier`` hooks run as built-in scripts' do (IP-Adapter)."""
    return webui_flow.generate(p, script_args, ForgeOrder(earlier))
