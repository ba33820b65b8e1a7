"""SDXL through the A1111 glue: two text encoders at their real widths (CLIP-L 768 as a transformers model, one layer;
OpenCLIP-G 1280 as an open_clip text tower read at its penultimate layer, two layers; real vocabulary), rows
concatenated to 2048 as ``crossattn``, the pooled ``vector`` kept; an ldm UNet with SDXL's block layout; the same
exactness as SD1.x, per half. A LoRA's OpenCLIP-G part (``lora_te2_``) acts on p' as the LoRA's definition says:
the same rows as the tower with ``W + ΔW`` merged into each of its q/k/v/out and MLP weights."""

import copy
from types import SimpleNamespace

import networks
import pytest
import torch
import torch.nn.functional as F
from hf_clip import HFClipEncoder
from ldm_parts import tiny_sd15_unet, tiny_sdxl_unet
from modules import sd_hijack, shared
from safetensors.torch import save_file
from webui_flow import FakeSDXLModel, Processing, generate, script_args
from weight_files import lora_state, random_factors, random_text_factors

from alignit.kv_hooks import attn2_modules

BOS, EOS, STAR = 49406, 49407, 265
L, G = 768, 1280


@pytest.fixture
def sdxl(model_l, open_clip_g, tokenizer, tmp_path, monkeypatch):
    text_model, model_g = model_l, open_clip_g
    unet = tiny_sdxl_unet()
    shared.sd_model = FakeSDXLModel(text_model, model_g, tokenizer, unet)
    database = sd_hijack.EmbeddingDatabase()
    sd_hijack.model_hijack.embedding_db = database
    generator = torch.Generator().manual_seed(11)
    vec = {"clip_l": torch.randn(2, L, generator=generator), "clip_g": torch.randn(2, G, generator=generator)}
    database.register_embedding(sd_hijack.Embedding(vec, "sks"), tokenizer(["sks"], add_special_tokens=False)["input_ids"][0])
    database.skipped_embeddings["old"] = sd_hijack.Embedding(torch.randn(1, L), "old")
    factors = random_factors(unet)
    state = lora_state(factors, random_text_factors(text_model), "kohya_ldm")
    te2 = open_clip_factors(model_g)
    for (layer, part), (down, up, alpha) in te2.items():
        base = f"lora_te2_text_model_encoder_layers_{layer}_{TE2_NAMES[part]}"
        state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha}
    save_file(state, str(tmp_path / "xl.safetensors"))
    save_file(lora_state(random_factors(tiny_sd15_unet()), None, "kohya"), str(tmp_path / "sd1.safetensors"))
    monkeypatch.setattr(
        networks,
        "available_network_aliases",
        {
            "xl": SimpleNamespace(filename=str(tmp_path / "xl.safetensors")),
            "sd1": SimpleNamespace(filename=str(tmp_path / "sd1.safetensors")),
        },
    )
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    return SimpleNamespace(vec=vec, unet=unet, factors=factors, model_l=text_model, model_g=model_g, tokenizer=tokenizer, te2=te2)


TE2_NAMES = {"q": "self_attn_q_proj", "k": "self_attn_k_proj", "v": "self_attn_v_proj", "out": "self_attn_out_proj"}
TE2_NAMES |= {"fc1": "mlp_fc1", "fc2": "mlp_fc2"}


def open_clip_factors(tower, rank=2, seed=5) -> dict:
    """Known LoRA factors ``(layer, part) → (down, up, alpha)`` for every attention slot and MLP layer of the tower."""
    generator = torch.Generator().manual_seed(seed)
    width, factors = tower.config.hidden_size, {}
    for layer in range(len(tower.transformer.resblocks)):
        for part, (out, inp) in {**dict.fromkeys(("q", "k", "v", "out"), (width, width)), "fc1": (4 * width, width)}.items():
            factors[(layer, part)] = (
                torch.randn(rank, inp, generator=generator) * 0.02,
                torch.randn(out, rank, generator=generator) * 0.02,
                torch.tensor(1.0),
            )
        factors[(layer, "fc2")] = (
            torch.randn(rank, 4 * width, generator=generator) * 0.02,
            torch.randn(width, rank, generator=generator) * 0.02,
            torch.tensor(1.0),
        )
    return factors


def merged(tower, factors, multiplier):
    """A copy of the tower with each ``ΔW = multiplier · α/r · up @ down`` added to the weight it names."""
    tower = copy.deepcopy(tower)
    with torch.no_grad():
        for (layer, part), (down, up, alpha) in factors.items():
            delta = multiplier * float(alpha) / down.shape[0] * (up @ down)
            block = tower.transformer.resblocks[layer]
            if part in ("q", "k", "v"):
                width = delta.shape[0]
                block.attn.in_proj_weight["qkv".index(part) * width : ("qkv".index(part) + 1) * width] += delta
            else:
                weight = {"out": block.attn.out_proj, "fc1": block.mlp.c_fc, "fc2": block.mlp.c_proj}[part].weight
                weight += delta
    return tower


def dummy(model, tokenizer, before, vectors, after):
    tokens = [BOS] + [STAR] * before + [0] * len(vectors) + [STAR] * after
    tokens += [EOS] * (77 - len(tokens))
    with torch.no_grad():
        rows = HFClipEncoder(model, tokenizer).encode_chunk(tokens, [1.0] * 77, [(before, vectors)])
    return rows[before + 1 : before + 1 + len(vectors)]


def test_embedding_with_clip_l_and_clip_g(sdxl):
    p = generate(Processing(["a <sks> playing badminton"], steps=1), script_args(["<sks>", "cat", "sks", 1.0]))
    assert p.comments == {}
    cond = p.sampled[0][0]
    base = shared.sd_model.get_learned_conditioning(["a cat playing badminton"])
    rows, base_rows = cond["crossattn"][0], base["crossattn"][0]
    assert rows.shape == base_rows.shape == (77, L + G)
    assert torch.equal(rows[:2], base_rows[:2])
    assert torch.equal(rows[2:4, :L], dummy(sdxl.model_l, sdxl.tokenizer, 1, sdxl.vec["clip_l"], 2))
    assert torch.equal(rows[2:4, L:], dummy(sdxl.model_g, sdxl.tokenizer, 1, sdxl.vec["clip_g"], 2))
    assert torch.equal(rows[4:76], base_rows[3:75]) and torch.equal(rows[76], base_rows[76])
    assert torch.equal(cond["vector"][0], base["vector"][0])  # the pooled vector stays the base model's for p


def test_an_sd1_embedding_on_sdxl_is_named_as_such(sdxl):
    p = generate(Processing(["an <old> on a sofa"], steps=1), script_args(["<old>", "cat", "", 1.0]))
    assert "made for another model family" in p.extra_generation_params["AlignIT warning"]
    assert p.prompts == ["an <old> on a sofa"]


def test_sdxl_lora_keys_values_and_text_parts(sdxl, monkeypatch):
    seen = []
    import webui_flow

    original = webui_flow.flow.before_sampling

    def observed(p, c):
        original(p, c)
        for key, module in attn2_modules(sdxl.unet).items():
            module.register_forward_hook(lambda m, i, o, k=key: seen.append((k, i[0][0].clone(), o[0].clone())))

    monkeypatch.setattr(webui_flow.flow, "before_sampling", observed)
    try:
        p = generate(Processing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:xl:0.5", 1.0]))
    finally:
        for module in attn2_modules(sdxl.unet).values():
            module._forward_hooks.clear()
    assert "AlignIT warning" not in p.extra_generation_params
    n = len(sdxl.tokenizer(["ohwx"], add_special_tokens=False)["input_ids"][0])
    for key, context, out in seen:
        down, up, alpha = sdxl.factors[key]
        concept = context[4 : 4 + n]
        want = (
            F.linear(concept, attn2_modules(sdxl.unet)[key].weight)
            + F.linear(F.linear(concept, down), up) * float(alpha) / 2 * 0.5
        )
        torch.testing.assert_close(out[4 : 4 + n], want, rtol=1e-5, atol=1e-6)
    ohwx = sdxl.tokenizer(["ohwx"], add_special_tokens=False)["input_ids"][0]
    tokens = [BOS, STAR, STAR, STAR, *ohwx] + [EOS] * (73 - n)
    with torch.no_grad():
        base_l = HFClipEncoder(sdxl.model_l, sdxl.tokenizer).encode_chunk(tokens, [1.0] * 77, [])[4 : 4 + n]
        base_g = HFClipEncoder(sdxl.model_g, sdxl.tokenizer).encode_chunk(tokens, [1.0] * 77, [])[4 : 4 + n]
        want_g = HFClipEncoder(merged(sdxl.model_g, sdxl.te2, 0.5), sdxl.tokenizer).encode_chunk(tokens, [1.0] * 77, [])
    rows = p.sampled[0][0]["crossattn"][0]
    torch.testing.assert_close(rows[4 : 4 + n, L:], want_g[4 : 4 + n], rtol=1e-5, atol=1e-5)  # G half: p' with te2
    assert not torch.allclose(rows[4 : 4 + n, L:], base_g, atol=1e-3)
    assert not torch.allclose(rows[4 : 4 + n, :L], base_l)  # L half: p' with the LoRA's text part


def test_an_sd1_lora_on_sdxl_is_refused(sdxl):
    p = generate(Processing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:sd1", 1.0]))
    assert "made for another model" in p.extra_generation_params["AlignIT warning"]
