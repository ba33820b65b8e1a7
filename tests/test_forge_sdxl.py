"""SDXL through the Forge glue: ``text_processing_engine_l``/``_g`` at their real widths (768 + 1280, one layer each,
real vocabulary), each with its own embedding database; ``crossattn`` rows spliced per half, the pooled ``vector``
kept; a LoRA's text parts applied to both engines (Forge's key map names ``lora_te2_`` for OpenCLIP-G)."""

from types import SimpleNamespace

import networks
import pytest
import torch
from forge_flow import FakeForgeSDXLModel, ForgeProcessing, generate
from hf_clip import HFClipEncoder
from ldm_parts import tiny_sdxl_unet
from modules import sd_hijack, shared
from safetensors.torch import save_file
from webui_flow import script_args
from weight_files import lora_state, random_factors, random_text_factors

from alignit.kv import LowRank
from alignit.text_lora import text_lora

BOS, EOS, STAR = 49406, 49407, 265
L, G = 768, 1280


@pytest.fixture
def sdxl(model_l, model_g, tokenizer, tmp_path, monkeypatch):
    unet = tiny_sdxl_unet()
    model = FakeForgeSDXLModel({"clip_l": model_l, "clip_g": model_g}, tokenizer, unet)
    monkeypatch.setattr(shared, "sd_model", model)
    generator = torch.Generator().manual_seed(11)
    vec = {"clip_l": torch.randn(2, L, generator=generator), "clip_g": torch.randn(2, G, generator=generator)}
    ids = tokenizer(["sks"], add_special_tokens=False)["input_ids"][0]
    for engine in model.engines():  # each engine loads the embedding folder into a database of its own
        engine.embeddings.register_embedding(sd_hijack.Embedding(vec, "sks"), ids)
    text_l, text_g = random_text_factors(model_l), random_text_factors(model_g, seed=3)
    state = lora_state(random_factors(unet), text_l, "kohya_ldm")
    state |= {k.replace("lora_te_", "lora_te2_"): v for k, v in lora_state({}, text_g, "kohya").items()}
    save_file(state, str(tmp_path / "xl.safetensors"))
    monkeypatch.setattr(networks, "available_network_aliases", {"xl": SimpleNamespace(filename=str(tmp_path / "xl.safetensors"))})
    ForgeProcessing.cached_c, ForgeProcessing.cached_uc = [None, None, None], [None, None, None]
    return SimpleNamespace(
        vec=vec, model=model, model_l=model_l, model_g=model_g, tokenizer=tokenizer, text_l=text_l, text_g=text_g
    )


def dummy(model, tokenizer, before, count, fixes):
    tokens = [BOS] + [STAR] * before + [0] * count + [STAR] * 2
    tokens += [EOS] * (77 - len(tokens))
    with torch.no_grad():
        rows = HFClipEncoder(model, tokenizer).encode_chunk(tokens, [1.0] * 77, fixes)
    return rows[before + 1 : before + 1 + count]


def test_embedding_with_clip_l_and_clip_g(sdxl):
    p = generate(ForgeProcessing(["a <sks> playing badminton"], steps=1), script_args(["<sks>", "cat", "sks", 1.0]))
    assert "AlignIT warning" not in p.extra_generation_params
    cond = p.sampled[0][1]
    base = sdxl.model.get_learned_conditioning(["a cat playing badminton"])
    rows, base_rows = cond[0], base["crossattn"][0]
    assert rows.shape == base_rows.shape == (77, L + G)
    assert torch.equal(rows[:2], base_rows[:2])
    assert torch.equal(rows[2:4, :L], dummy(sdxl.model_l, sdxl.tokenizer, 1, 2, [(1, sdxl.vec["clip_l"])]))
    assert torch.equal(rows[2:4, L:], dummy(sdxl.model_g, sdxl.tokenizer, 1, 2, [(1, sdxl.vec["clip_g"])]))
    assert torch.equal(rows[4:76], base_rows[3:75]) and torch.equal(rows[76], base_rows[76])


def test_lora_text_parts_reach_both_engines(sdxl):
    p = generate(ForgeProcessing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:xl", 1.0]))
    assert "AlignIT warning" not in p.extra_generation_params
    rows = p.sampled[0][1][0]
    ohwx = sdxl.tokenizer(["ohwx"], add_special_tokens=False)["input_ids"][0]
    assert len(ohwx) == 1
    tokens = [BOS, STAR, STAR, STAR, *ohwx, STAR, STAR] + [EOS] * 70  # p' of "a photo of ohwx"

    def encoded(model, factors):
        lora = {k.replace(".", "_"): LowRank(d, u, float(a) / 2) for k, (d, u, a) in factors.items()}
        with torch.no_grad(), text_lora(model, lora):
            return HFClipEncoder(model, sdxl.tokenizer).encode_chunk(tokens, [1.0] * 77, [])[4]

    torch.testing.assert_close(rows[4, :L], encoded(sdxl.model_l, sdxl.text_l), rtol=0, atol=0)
    torch.testing.assert_close(rows[4, L:], encoded(sdxl.model_g, sdxl.text_g), rtol=0, atol=0)
    with torch.no_grad():
        plain_g = HFClipEncoder(sdxl.model_g, sdxl.tokenizer).encode_chunk(tokens, [1.0] * 77, [])[4]
    assert not torch.equal(rows[4, L:], plain_g)  # the OpenCLIP-G part did apply
