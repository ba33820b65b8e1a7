"""LyCORIS concepts through the A1111 glue (hook order and the contract's mirror of the Lora extension's network
modules): each type's ``ΔW`` on the concept's K/V rows and text-encoder layers, against the type's definition written
out here by hand, at the LoRA weight 0.8."""

import copy
from types import SimpleNamespace

import networks
import pytest
import torch
import torch.nn.functional as F
from hf_clip import HFClipEncoder
from ldm_parts import tiny_sd15_unet
from modules import sd_hijack, shared
from safetensors.torch import save_file
from test_a1111_weights import seen  # noqa: F401 - the fixture
from webui_flow import FakeModel, Processing, generate, script_args

from alignit.hosts.webui import a1111
from alignit.kv_hooks import attn2_modules

WEIGHT = 0.8
RANK = 2


def rand(generator, *shape, scale=0.3):
    return torch.randn(*shape, generator=generator) * scale


def kohya(layer: str, proj: str) -> str:
    return f"lora_unet_{layer}.to_{proj}".replace(".", "_")


def loha(generator, out, inp):
    parts = {"hada_w1_a": rand(generator, out, RANK), "hada_w1_b": rand(generator, RANK, inp)}
    parts |= {"hada_w2_a": rand(generator, out, RANK), "hada_w2_b": rand(generator, RANK, inp), "alpha": torch.tensor(1.0)}
    delta = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"]) * (1.0 / RANK)
    return parts, lambda weight: delta


def lokr_w2_factorised(generator, out, inp):
    parts = {"lokr_w1": rand(generator, 2, 4), "lokr_w2_a": rand(generator, out // 2, RANK)}
    parts |= {"lokr_w2_b": rand(generator, RANK, inp // 4), "alpha": torch.tensor(3.0)}
    delta = torch.kron(parts["lokr_w1"], parts["lokr_w2_a"] @ parts["lokr_w2_b"]) * (3.0 / RANK)
    return parts, lambda weight: delta


def lokr_w1_factorised(generator, out, inp):
    parts = {"lokr_w1_a": rand(generator, 4, RANK), "lokr_w1_b": rand(generator, RANK, 2)}
    parts |= {"lokr_w2": rand(generator, out // 4, inp // 2), "alpha": torch.tensor(1.0)}
    delta = torch.kron(parts["lokr_w1_a"] @ parts["lokr_w1_b"], parts["lokr_w2"]) * (1.0 / RANK)
    return parts, lambda weight: delta


def lokr_whole(generator, out, inp):
    parts = {"lokr_w1": rand(generator, 2, 2), "lokr_w2": rand(generator, out // 2, inp // 2)}
    delta = torch.kron(parts["lokr_w1"], parts["lokr_w2"])  # no factorised part: no alpha/rank scale
    return parts, lambda weight: delta


def ia3_output(generator, out, inp):
    parts = {"weight": rand(generator, out), "on_input": torch.tensor(False)}
    return parts, lambda weight: weight * parts["weight"][:, None]


def ia3_input(generator, out, inp):
    parts = {"weight": rand(generator, inp), "on_input": torch.tensor(True)}
    return parts, lambda weight: weight * parts["weight"][None, :]


def dora(generator, out, inp):
    parts = {"lora_down.weight": rand(generator, RANK, inp), "lora_up.weight": rand(generator, out, RANK)}
    parts |= {"alpha": torch.tensor(1.0), "dora_scale": 0.5 + torch.rand(1, inp, generator=generator)}

    def delta(weight):  # W' = (W + ΔW) rescaled so that column j has norm dora_scale[j]; the multiplier on W' − W
        merged = weight + parts["lora_up.weight"] @ parts["lora_down.weight"] * (1.0 / RANK)
        return merged * (parts["dora_scale"] / merged.norm(dim=0, keepdim=True)) - weight

    return parts, delta


def full(generator, out, inp):
    parts = {"diff": rand(generator, out, inp)}
    return parts, lambda weight: parts["diff"]


def locon(generator, out, inp):
    parts = {"lora_down.weight": rand(generator, RANK, inp), "lora_up.weight": rand(generator, out, RANK)}
    parts["alpha"] = torch.tensor(1.0)
    return parts, lambda weight: parts["lora_up.weight"] @ parts["lora_down.weight"] * (1.0 / RANK)


KINDS = {f.__name__: f for f in (loha, lokr_w2_factorised, lokr_w1_factorised, lokr_whole, ia3_output, ia3_input, dora)}
KINDS |= {"full": full, "locon": locon}


@pytest.fixture
def lyco(text_model, tokenizer, tmp_path, monkeypatch):
    """A model and one LyCORIS file per kind over every attn2 to_k/to_v (the LoCon also with a conv part, the full diff
    also with a bias part, the LoHa also on the text encoder's q_proj layers), with each layer's expected ``ΔW``."""
    unet = tiny_sd15_unet()
    shared.sd_model = FakeModel(text_model, tokenizer, unet)
    sd_hijack.model_hijack.embedding_db = sd_hijack.EmbeddingDatabase()
    modules, generator = attn2_modules(unet), torch.Generator().manual_seed(0)
    aliases, deltas = {}, {}
    for kind, make in KINDS.items():
        state, deltas[kind] = {}, {}
        for (layer, proj), module in modules.items():
            parts, delta = make(generator, *module.weight.shape)
            state |= {f"{kohya(layer, proj)}.{part}": tensor for part, tensor in parts.items()}
            deltas[kind][(layer, proj)] = delta(module.weight.detach())
        if kind == "locon":
            state |= {"lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": rand(generator, RANK, 32, 3, 3)}
            state |= {"lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": rand(generator, 32, RANK, 1, 1)}
        if kind == "full":
            state[f"{kohya(*next(iter(modules)))}.diff_b"] = rand(generator, 32)
        if kind == "loha":
            for name, module in text_model.named_modules():
                if name.endswith("q_proj"):
                    parts, delta = make(generator, *module.weight.shape)
                    base = "lora_te_" + name.replace(".", "_")
                    state |= {f"{base}.{part}": tensor for part, tensor in parts.items()}
                    deltas["text"] = {**deltas.get("text", {}), name: delta(module.weight.detach())}
        save_file(state, str(tmp_path / f"{kind}.safetensors"))
        aliases[kind] = SimpleNamespace(filename=str(tmp_path / f"{kind}.safetensors"))
    monkeypatch.setattr(networks, "available_network_aliases", aliases)
    Processing.cached_c, Processing.cached_uc = [None, None], [None, None]
    yield SimpleNamespace(unet=unet, deltas=deltas, text_model=text_model, tokenizer=tokenizer)
    a1111.retire_hooks()


def ohwx_rows():
    n = len(shared.sd_model.cond_stage_model.tokenize(["ohwx"])[0])
    return slice(4, 4 + n)


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_type_on_the_concept_keys_and_values(lyco, seen, kind):  # noqa: F811 - the fixture
    p = generate(
        Processing(["a photo of ohwx playing badminton"], steps=1), script_args(["ohwx", "man", f"lora:{kind}:0.8", 1.0])
    )
    warning = p.extra_generation_params.get("AlignIT warning", "")
    assert warning == (
        ""
        if kind != "full"
        else "LoRA 'full': the bias part of input_blocks.1.1.transformer_blocks.0.attn2.to_k is not applied to the concept"
    )
    rows = ohwx_rows()
    assert len(seen) == 32
    for key, context, out in seen:
        weight = attn2_modules(lyco.unet)[key].weight
        want = F.linear(context[rows], weight) + WEIGHT * F.linear(context[rows], lyco.deltas[kind][key])
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)
        others = [i for i in range(77) if i not in range(rows.start, rows.stop)]
        assert torch.equal(out[others], F.linear(context, weight)[others])


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_the_full_scope_takes_the_webuis_own_delta_back_out(lyco, seen, kind):  # noqa: F811 - the fixture
    """In the "full" scope A1111 merges the LyCORIS ``ΔW`` into every to_k/to_v: AlignIT takes it back out of every row
    and gives the concept rows theirs."""
    modules = attn2_modules(lyco.unet)
    base = {key: module.weight.detach().clone() for key, module in modules.items()}
    p = generate(
        Processing(["a photo of ohwx playing"], steps=1), script_args(["ohwx", "man", f"lora:{kind}:0.8", 1.0], scope="full")
    )
    assert [params.items for params in p.extra_network_data["lora"]] == [[kind, "0", "0.8"]]
    rows = ohwx_rows()
    for key, context, out in seen:
        want = F.linear(context, base[key])
        want[rows] += WEIGHT * F.linear(context[rows], lyco.deltas[kind][key])
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_loha_text_parts_shape_p_prime_as_merged_weights(lyco):
    p = generate(Processing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:loha:0.8", 1.0]))
    assert "AlignIT warning" not in p.extra_generation_params
    merged = copy.deepcopy(lyco.text_model)
    with torch.no_grad():
        for name, delta in lyco.deltas["text"].items():
            merged.get_submodule(name).weight += WEIGHT * delta
    rows = ohwx_rows()
    tokens = [49406, 265, 265, 265, *shared.sd_model.cond_stage_model.tokenize(["ohwx"])[0]]
    tokens += [49407] * (77 - len(tokens))
    with torch.no_grad():
        want = HFClipEncoder(merged, lyco.tokenizer).encode_chunk(tokens, [1.0] * 77, [])
    torch.testing.assert_close(p.sampled[0][0][0][rows], want[rows], rtol=1e-5, atol=1e-5)


def test_weight_dependent_types_read_the_weight_without_merged_networks(lyco, seen):  # noqa: F811 - the fixture
    """(IA)³ and DoRA are computed on the layer's own weight: the Lora extension's backup when it has merged another
    LoRA into the weight (networks.py network_apply_weights), not the merged weight."""
    modules = attn2_modules(lyco.unet)
    with torch.no_grad():
        for module in modules.values():
            module.network_weights_backup = module.weight.detach().clone()
            module.weight += 0.5
    try:
        generate(Processing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:ia3_output:0.8", 1.0]))
        rows = ohwx_rows()
        for key, context, out in seen:
            want = F.linear(context[rows], modules[key].weight) + WEIGHT * F.linear(context[rows], lyco.deltas["ia3_output"][key])
            torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)
    finally:
        with torch.no_grad():
            for module in modules.values():
                module.weight.copy_(module.network_weights_backup)
                del module.network_weights_backup


def test_parts_no_module_type_reads_are_refused(lyco, tmp_path, monkeypatch):
    layer, proj = next(iter(attn2_modules(lyco.unet)))
    save_file({f"{kohya(layer, proj)}.oft_blocks": torch.zeros(4, 8, 8)}, str(tmp_path / "oft.safetensors"))
    monkeypatch.setitem(networks.available_network_aliases, "oft", SimpleNamespace(filename=str(tmp_path / "oft.safetensors")))
    p = generate(Processing(["a photo of ohwx"], steps=1), script_args(["ohwx", "man", "lora:oft", 1.0]))
    assert "A1111's Lora extension reads no module of the parts oft_blocks" in p.extra_generation_params["AlignIT warning"]
    assert p.prompts == ["a photo of ohwx"]
