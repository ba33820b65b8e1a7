"""The functional text-encoder LoRA on an open_clip text tower (A1111's OpenCLIP-G): the same outputs as the tower
with every ``ΔW`` merged into its weights, nothing left behind, and the host's own attention forward run first."""

import copy

import pytest
import torch
from clip_parts import open_clip_text_model

from alignit.errors import ConceptError
from alignit.kv import Dense, LowRank
from alignit.text_lora import open_clip_text_lora

WIDTH = 32
PARTS = {"q": "self_attn_q_proj", "k": "self_attn_k_proj", "v": "self_attn_v_proj", "out": "self_attn_out_proj"}
PARTS |= {"fc1": "mlp_fc1", "fc2": "mlp_fc2"}


@pytest.fixture(scope="module")
def tower():
    return open_clip_text_model(WIDTH, layers=3, heads=4, seed=3)


def deltas(seed=0):
    """Known ``ΔW`` (dense) for every part of layers 0 and 1: ``(layer, part) → matrix``."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {**dict.fromkeys(("q", "k", "v", "out"), (WIDTH, WIDTH)), "fc1": (4 * WIDTH, WIDTH), "fc2": (WIDTH, 4 * WIDTH)}
    return {(layer, part): torch.randn(*shape, generator=generator) * 0.1 for layer in (0, 1) for part, shape in shapes.items()}


def factors(known, low_rank_layer=0):
    """The deltas as AlignIT takes them: layer ``low_rank_layer`` as rank-``WIDTH`` factors, the others dense."""
    out = {}
    for (layer, part), delta in known.items():
        name = f"encoder_layers_{layer}_{PARTS[part]}"
        out[name] = LowRank(torch.eye(delta.shape[1]), delta, 1.0) if layer == low_rank_layer else Dense(delta)
    return out


def merged(tower, known):
    tower = copy.deepcopy(tower)
    with torch.no_grad():
        for (layer, part), delta in known.items():
            block = tower.transformer.resblocks[layer]
            if part in ("q", "k", "v"):
                index = "qkv".index(part)
                block.attn.in_proj_weight[index * WIDTH : (index + 1) * WIDTH] += delta
            else:
                {"out": block.attn.out_proj, "fc1": block.mlp.c_fc, "fc2": block.mlp.c_proj}[part].weight += delta
    return tower


def encode(tower, ids):
    with torch.no_grad():
        return tower(input_ids=ids, output_hidden_states=True).hidden_states[-1]


IDS = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(1))


def test_same_outputs_as_merged_weights_and_nothing_left(tower):
    known = deltas()
    before = {name: tensor.clone() for name, tensor in tower.state_dict().items()}
    with open_clip_text_lora(tower.transformer, factors(known)):
        got = encode(tower, IDS)
    torch.testing.assert_close(got, encode(merged(tower, known), IDS), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, encode(tower, IDS), atol=1e-3)
    assert all(torch.equal(before[name], tensor) for name, tensor in tower.state_dict().items())
    for block in tower.transformer.resblocks:
        assert "forward" not in block.attn.__dict__ and not block.mlp.c_fc._forward_hooks and not block.mlp.c_proj._forward_hooks


def test_batch_first_attention():
    torch.manual_seed(0)
    attention = torch.nn.MultiheadAttention(WIDTH, 4, batch_first=True).eval()
    transformer = torch.nn.Module()
    transformer.resblocks = torch.nn.ModuleList([torch.nn.Module()])
    transformer.resblocks[0].attn = attention
    transformer.resblocks[0].mlp = torch.nn.Module()
    delta = torch.randn(WIDTH, WIDTH) * 0.1
    x = torch.randn(2, 5, WIDTH)
    with torch.no_grad(), open_clip_text_lora(transformer, {"encoder_layers_0_self_attn_v_proj": Dense(delta)}):
        got = attention(x, x, x, need_weights=False)[0]
    reference = copy.deepcopy(attention)
    with torch.no_grad():
        reference.in_proj_weight[2 * WIDTH :] += delta
        torch.testing.assert_close(got, reference(x, x, x, need_weights=False)[0], rtol=1e-5, atol=1e-6)


def test_the_hosts_own_attention_forward_runs_first(tower, monkeypatch):
    """A1111's Lora extension patches ``MultiheadAttention.forward`` to merge the prompt's networks into the weights
    before attending: the concept's deltas are added to the weights as they are after that."""
    known = deltas(seed=2)
    network = torch.randn(3 * WIDTH, WIDTH, generator=torch.Generator().manual_seed(4)) * 0.1
    original = torch.nn.MultiheadAttention.forward
    applied = set()

    def network_forward(self, *args, **kwargs):  # networks.py network_MultiheadAttention_forward
        if id(self) not in applied:
            applied.add(id(self))
            with torch.no_grad():
                self.in_proj_weight += network
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", network_forward)
    host = copy.deepcopy(tower)
    with open_clip_text_lora(host.transformer, factors(known)):
        got = encode(host, IDS)
    with_network = copy.deepcopy(tower)
    with torch.no_grad():
        for block in with_network.transformer.resblocks:
            block.attn.in_proj_weight += network
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward", original)
    torch.testing.assert_close(got, encode(merged(with_network, known), IDS), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "delta", "message"),
    [
        ("encoder_layers_7_self_attn_q_proj", Dense(torch.zeros(WIDTH, WIDTH)), "does not have"),
        ("encoder_layers_0_self_attn_q", Dense(torch.zeros(WIDTH, WIDTH)), "does not have"),
        ("encoder_layers_0_self_attn_k_proj", Dense(torch.zeros(WIDTH, 8)), "another model"),
        ("encoder_layers_0_mlp_fc2", Dense(torch.zeros(WIDTH, WIDTH)), "another model"),
    ],
)
def test_parts_this_tower_lacks_are_refused(tower, name, delta, message):
    with pytest.raises(ConceptError, match=message), open_clip_text_lora(tower.transformer, {name: delta}):
        pass
