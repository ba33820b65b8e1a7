"""ComfyUI (v0.8.0, fc0cb10b) driven against the contract in tests/contract/comfy: a checkpoint's CLIP and MODEL
built from test parts, the nodes run as ComfyUI runs them, and a sampler that hands the UNet what ComfyUI's hands it.

The sampler mirrors comfy/samplers.py ``_calc_cond_batch`` (217-349): the entries of the positive and negative
conditioning that apply at this point of the schedule (``start_percent``/``end_percent``, 24-39 and 620-643; here the
step's fraction stands in for its sigma) are batched uncond first (the batch list is reversed, 259), contexts of
unequal lengths repeated to their LCM (comfy/conds.py 63-76), with ``cond_or_uncond`` and ``uuids`` in
``transformer_options`` (309-316); each entry's output is averaged into its conditioning's (335-350). The UNet's
cross-attention runs with ComfyUI's patch semantics (``BasicTransformerBlock.forward``, comfy/ldm/modules/attention.py
919-944: the ``attn2_patch`` list on ``(n, context, value)``, then the replace patch of ``(block, id, block_index)`` or
``(block, id)`` on ``q = to_q(n)``, ``k = to_k(context)``, ``v = to_v(value)``, else ``optimized_attention``; the UNet
sets ``block`` and ``block_index``, openaimodel.py 872-893 and attention.py 1020), in inference mode as ComfyUI samples.
"""

from __future__ import annotations

import contextlib
import math
import re
import uuid
from types import SimpleNamespace

import folder_paths
import torch
from clip_parts import clip_text_model, clip_tokenizer
from comfy import sd1_clip, sdxl_clip
from comfy.ldm.modules.attention import optimized_attention
from comfy.model_patcher import ModelPatcher
from comfy.sd import CLIP
from ldm_parts import unet as ldm_unet

from alignit.hosts.comfyui import nodes

_ATTN2 = re.compile(r"^(?:(input|output)_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.attn2$")


class BaseModel(torch.nn.Module):
    """comfy/model_base.py 125: the MODEL patcher's ``model``, holding ``diffusion_model``."""

    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model


def sd15(text_model, unet) -> SimpleNamespace:
    """What CheckpointLoaderSimple gives for an SD1.x checkpoint: MODEL, CLIP (embeddings from the folder)."""
    width = text_model.config.hidden_size
    tokenizer = sd1_clip.SD1Tokenizer(clip_tokenizer(), folder_paths.get_folder_paths("embeddings"), embedding_size=width)
    clip = CLIP.of(sd1_clip.SD1ClipModel(sd1_clip.SDClipModel(text_model)), tokenizer)
    return SimpleNamespace(model=ModelPatcher(BaseModel(unet)), clip=clip, unet=unet, text_model=text_model)


def sdxl_text_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    """CLIP-L and OpenCLIP-G stand-ins, 32 and 48 wide (context 80), three layers (ComfyUI takes the hidden state -2)."""
    return clip_text_model(32, layers=3, heads=4, seed=6), clip_text_model(48, layers=3, heads=4, seed=7)


def sdxl_unet() -> torch.nn.Module:
    """SDXL's block layout (cross-attention at levels 2 and 3, linear projections) for an 80-wide context."""
    return ldm_unet(80, 32, [1, 2, 4], [2, 4], num_res_blocks=2, num_head_channels=16, use_linear_in_transformer=True)


def sdxl(model_l, model_g, unet) -> SimpleNamespace:
    sizes = (model_l.config.hidden_size, model_g.config.hidden_size)
    tokenizer = sdxl_clip.SDXLTokenizer(clip_tokenizer(), folder_paths.get_folder_paths("embeddings"), sizes)
    clip = CLIP.of(sdxl_clip.SDXLClipModel(model_l, model_g), tokenizer)
    return SimpleNamespace(model=ModelPatcher(BaseModel(unet)), clip=clip, unet=unet)


def clip_text_encode(clip, text):
    """CLIPTextEncode.encode (nodes.py 73-77), in inference mode."""
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def concepts(*rows, **options):
    """AlignIT Concept nodes chained: each row ``(trigger, class word, source[, strength])``."""
    chain = None
    for row in rows:
        trigger, class_word, source, *rest = row
        (chain,) = nodes.AlignITConcept().add(trigger, class_word, source, rest[0] if rest else 1.0, chain, **options)
    return chain


def text_encode(checkpoint, text, chain, **options):
    """AlignIT Text Encode as ComfyUI runs a node (in inference mode, execution.py 688): (CONDITIONING, MODEL, the
    node's UI messages)."""
    with torch.inference_mode():
        out = nodes.AlignITTextEncode().encode(checkpoint.clip, checkpoint.model, text, chain, unique_id="5", **options)
    conditioning, model = out["result"]
    return conditioning, model, out.get("ui", {}).get("text", [])


def _attn2(module, block, index, transformer_options, x, context=None, mask=None):
    patches = transformer_options.get("patches", {})
    replace = transformer_options.get("patches_replace", {}).get("attn2", {})
    extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
    extra |= {"block": block, "block_index": index, "n_heads": module.heads, "dim_head": module.to_q.out_features // module.heads}
    extra["attn_precision"] = None
    n, value = x, None
    if "attn2_patch" in patches:
        value = context
        for patch in patches["attn2_patch"]:
            n, context, value = patch(n, context, value, extra)
    value = context if value is None else value
    key = (block[0], block[1], index)
    if key not in replace:
        key = block
    q, k, v = module.to_q(n), module.to_k(context), module.to_v(value)
    if key in replace:
        out = replace[key](q, k, v, extra)
    else:
        out = optimized_attention(q, k, v, module.heads, transformer_options=transformer_options)
    return module.to_out(out)


@contextlib.contextmanager
def comfy_attention(unet, transformer_options):
    """The ldm UNet's cross-attention layers run with ComfyUI's patch semantics while the block runs."""
    swapped = []
    for name, module in unet.named_modules():
        match = _ATTN2.match(name)
        if match:
            kind, number, index = match.groups()
            block = (kind or "middle", int(number or 0))
            module.forward = lambda x, context=None, mask=None, m=module, b=block, i=int(index): _attn2(
                m, b, i, transformer_options, x, context, mask
            )
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def _active(entry, fraction):
    extra = entry[1]
    return extra.get("start_percent", 0.0) <= fraction <= extra.get("end_percent", 1.0)


def sample(model, positive, negative, steps=2, batch=1, cfg=7.0, record=None):
    """Per step, the UNet on the active entries of both conditionings; returns each step's cond and uncond outputs
    and, in ``record``, each step's (cond entries, transformer_options)."""
    outputs = []
    for step in range(steps):
        fraction = step / steps
        to_run = [(entry, 0) for entry in positive if _active(entry, fraction)]
        if not math.isclose(cfg, 1.0):
            to_run += [(entry, 1) for entry in negative if _active(entry, fraction)]
        to_run.reverse()
        length = math.lcm(*(entry[0].shape[1] for entry, _ in to_run))
        context = torch.cat([entry[0].repeat(batch, length // entry[0].shape[1], 1) for entry, _ in to_run])
        options = dict(model.model_options["transformer_options"])
        options |= {"cond_or_uncond": [kind for _, kind in to_run], "uuids": [uuid.uuid4() for _ in to_run]}
        options["sigmas"] = torch.full((1,), float(steps - step))
        if record is not None:
            record.append(([entry for entry, kind in to_run if kind == 0], options))
        unet = model.model.diffusion_model
        x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(step)).repeat(len(to_run), 1, 1, 1)
        with torch.inference_mode(), comfy_attention(unet, options):
            out = unet(x, torch.full((x.shape[0],), 500), context=context).chunk(len(to_run))
        by_kind = {0: [], 1: []}
        for (_, kind), chunk in zip(to_run, out):
            by_kind[kind].append(chunk)
        outputs.append([torch.stack(by_kind[kind]).mean(0) if by_kind[kind] else None for kind in (0, 1)])
    return outputs


def kv_recorder(model, calls: list):
    """An earlier node's attn2 patches on a clone of ``model`` (IPAdapter keys its replace patches ``(block, id)``,
    IPAdapterPlus.py 764-769): one notes each block's context, the replace patch records the k/v handed to it as
    ``((layer, proj), context, output, cond_or_uncond)`` and attends."""
    clone = model.clone()
    contexts: list = []
    clone.set_model_attn2_patch(lambda n, context, value, extra: (contexts.append(context), (n, context, value))[1])
    for name, _ in clone.model.diffusion_model.named_modules():
        match = _ATTN2.match(name)
        if match:
            kind, number, _index = match.groups()

            def replace(q, k, v, extra, layer=name):
                order = tuple(extra["cond_or_uncond"])
                calls.extend([((layer, "k"), contexts[-1], k.clone(), order), ((layer, "v"), contexts[-1], v.clone(), order)])
                return optimized_attention(q, k, v, extra["n_heads"])

            clone.set_model_attn2_replace(replace, kind or "middle", int(number or 0))
    return clone
