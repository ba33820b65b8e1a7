"""LyCORIS concepts through the Forge glue (hook order and the contract's mirror of Forge's ``load_lora`` and
``merge_lora_to_weight``): each type's ``ΔW`` on the concept's keys and values, against the definitions written out
in test_a1111_lycoris.py, at the LoRA weight 0.8. Forge's loader does not read (IA)³ (test_forge_glue.py)."""

from types import SimpleNamespace

import networks
import pytest
import torch
import torch.nn.functional as F
from forge_flow import FakeForgeModel, ForgeProcessing, generate
from ldm_parts import tiny_sd15_unet
from modules import shared
from safetensors.torch import save_file
from test_a1111_lycoris import KINDS, WEIGHT, kohya
from test_forge_glue import recorder
from webui_flow import script_args

from alignit.kv_hooks import attn2_modules

FORGE_KINDS = [kind for kind in KINDS if not kind.startswith("ia3")]


@pytest.fixture
def forge_lyco(text_model, tokenizer, tmp_path, monkeypatch):
    unet = tiny_sd15_unet()
    model = FakeForgeModel({"clip_l": text_model}, tokenizer, unet)
    monkeypatch.setattr(shared, "sd_model", model)
    generator, aliases, deltas = torch.Generator().manual_seed(0), {}, {}
    for kind in FORGE_KINDS:
        state, deltas[kind] = {}, {}
        for (layer, proj), module in attn2_modules(unet).items():
            parts, delta = KINDS[kind](generator, *module.weight.shape)
            state |= {f"{kohya(layer, proj)}.{part}": tensor for part, tensor in parts.items()}
            deltas[kind][(layer, proj)] = delta(module.weight.detach())
        save_file(state, str(tmp_path / f"{kind}.safetensors"))
        aliases[kind] = SimpleNamespace(filename=str(tmp_path / f"{kind}.safetensors"))
    monkeypatch.setattr(networks, "available_network_aliases", aliases)
    ForgeProcessing.cached_c, ForgeProcessing.cached_uc = [None, None, None], [None, None, None]
    return SimpleNamespace(unet=unet, deltas=deltas)


@pytest.mark.parametrize("kind", FORGE_KINDS)
def test_each_type_on_the_concept_keys_and_values(forge_lyco, kind):
    seen: list = []
    row = ["ohwx", "man", f"lora:{kind}:{WEIGHT}", 1.0]
    p = generate(ForgeProcessing(["a photo of ohwx playing"], steps=1), script_args(row), earlier=[recorder(seen)])
    assert "AlignIT warning" not in p.extra_generation_params
    assert len(seen) == 16
    cond = p.sampled[0][1][0]
    for layer, k, v, _ in seen:
        for proj, got in (("k", k), ("v", v)):
            weight = attn2_modules(forge_lyco.unet)[(layer, proj)].weight
            want = F.linear(cond, weight) + WEIGHT * F.linear(cond, forge_lyco.deltas[kind][(layer, proj)])
            torch.testing.assert_close(got[1, 4:5], want[4:5], rtol=1e-5, atol=1e-5)  # ohwx: one token here
            assert torch.equal(got[1, 5:], F.linear(cond, weight)[5:])
