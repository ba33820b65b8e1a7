"""Reading LoRA and Custom Diffusion files in every key scheme, safely."""

import pickle

import pytest
import torch
from ldm_parts import tiny_sd15_unet
from safetensors.torch import save_file
from weight_files import cd_state, lora_state, random_cd_weights, random_factors, random_text_factors

from alignit.errors import ConceptError
from alignit.sources.custom_diffusion import load_custom_diffusion
from alignit.sources.lora import load_lora
from alignit.sources.names import attn2_projection


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet()


@pytest.mark.parametrize(
    ("key", "expected"),
    [  # pairs from the SD1.5 layout (diffusers' conversion script)
        ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_k.lora_down.weight", "input_blocks.2.1"),
        ("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight", "input_blocks.7.1"),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora.up.weight", "middle_block.1"),
        ("lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha", "output_blocks.3.1"),
        ("up_blocks.3.attentions.2.transformer_blocks.0.attn2.processor.to_v_custom_diffusion.weight", "output_blocks.11.1"),
        ("lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k.lora_up.weight", "input_blocks.8.1"),
        ("model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight", "output_blocks.5.1"),
    ],
)
def test_names_map_to_ldm_layers(key, expected):
    layer, proj = attn2_projection(key)
    assert layer.startswith(expected + ".transformer_blocks.") and layer.endswith(".attn2")
    assert proj == key.split("to_")[-1][0]


def test_other_modules_are_not_attn2():
    assert attn2_projection("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight") is None
    assert attn2_projection("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight") is None


@pytest.mark.parametrize("scheme", ["kohya", "kohya_ldm", "peft", "diffusers_old"])
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_lora_schemes(tmp_path, unet, text_model, scheme, suffix):
    factors, text = random_factors(unet), random_text_factors(text_model)
    state = lora_state(factors, text if scheme != "diffusers_old" else None, scheme)
    path = tmp_path / f"concept{suffix}"
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save(state, path)
    lora = load_lora(path)
    assert lora.name == "concept" and set(lora.kv) == set(factors) and len(factors) == 32
    for key, (down, up, alpha) in factors.items():
        got = lora.kv[key]
        assert torch.equal(got.down, down) and torch.equal(got.up, up)
        assert got.scale == (1.0 if scheme in ("peft", "diffusers_old") else float(alpha) / 2)
    if scheme != "diffusers_old":
        assert set(lora.text) == {name.replace(".", "_") for name in text}


@pytest.mark.parametrize("scheme", ["delta_bin", "compvis", "diffusers"])
def test_custom_diffusion_formats(tmp_path, unet, scheme):
    weights = random_cd_weights(unet)
    modifier = torch.randn(1, 32)
    path = tmp_path / ("delta.bin" if scheme != "diffusers" else "pytorch_custom_diffusion_weights.safetensors")
    state = cd_state(weights, modifier, scheme)
    save_file(state, str(path)) if path.suffix == ".safetensors" else torch.save(state, path)
    delta = load_custom_diffusion(path)
    assert set(delta.kv) == set(weights)
    assert all(torch.equal(delta.kv[key].weight, w) for key, w in weights.items())
    if scheme == "diffusers":
        assert delta.modifier_tokens == {}
    else:
        assert list(delta.modifier_tokens) == ["<new1>"] and torch.equal(delta.modifier_tokens["<new1>"], modifier)


class Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickles_that_run_code_are_refused(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"lora_unet_x.lora_down.weight": Payload()}, f)
    with pytest.raises(ConceptError, match="cannot read evil.pt"):
        load_lora(path)
    assert "code ran" not in capsys.readouterr().out


def test_corrupt_and_empty_files(tmp_path):
    corrupt = tmp_path / "broken.safetensors"
    corrupt.write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ConceptError, match="cannot read broken.safetensors"):
        load_lora(corrupt)
    empty = tmp_path / "unrelated.safetensors"
    save_file({"some.weight": torch.zeros(2, 2)}, str(empty))
    with pytest.raises(ConceptError, match="holds no LoRA factors"):
        load_lora(empty)
    with pytest.raises(ConceptError, match="no attn2"):
        load_custom_diffusion(empty)
    with pytest.raises(ConceptError, match="no file"):
        load_lora(tmp_path / "missing.safetensors")


def test_a_pickle_of_something_else(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ConceptError, match="holds a list, not a dict"):
        load_lora(path)


def test_torch_load_replaced_by_the_webui_is_not_used(tmp_path, monkeypatch):
    """A1111's modules/safe.py replaces torch.load with a scanner that refuses files from torch >= 2.5 and returns
    None; AlignIT reads pickles with its own loader (alignit.sources.safe_pickle) instead."""
    path = tmp_path / "delta.bin"
    torch.save(
        {"state_dict": {"model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": torch.ones(2, 2)}}, path
    )
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: None)
    assert list(load_custom_diffusion(path).kv) == [("middle_block.1.transformer_blocks.0.attn2", "k")]


def test_the_file_cache_is_bounded_in_bytes_and_follows_the_file(tmp_path, monkeypatch):
    from alignit.sources import files

    monkeypatch.setattr(files, "CACHE_BYTES", 3 * 4 * 100)  # three files of 100 floats
    monkeypatch.setattr(files, "_cache", type(files._cache)())
    reads = []

    def reader(path):
        reads.append(path)
        return {"t": torch.zeros(100)}

    paths = [tmp_path / f"{i}.bin" for i in range(4)]
    for path in paths:
        path.write_bytes(b"x")
    for path in paths[:3] + paths[:1]:
        files.read_cached(reader, path)
    assert len(reads) == 3  # the fourth read of the first file came from the cache
    files.read_cached(reader, paths[3])  # over the budget: the least recently used (the second file) goes
    files.read_cached(reader, paths[0])
    files.read_cached(reader, paths[1])
    assert [p.rsplit("/", 1)[1] for p in reads] == ["0.bin", "1.bin", "2.bin", "3.bin", "1.bin"]
    paths[0].write_bytes(b"changed")  # another size: read again
    files.read_cached(reader, paths[0])
    assert reads[-1].endswith("0.bin") and len(reads) == 6
    assert files.tensor_bytes({"a": [torch.zeros(2, 3)], "b": (torch.zeros(1, dtype=torch.float16),)}) == 26
