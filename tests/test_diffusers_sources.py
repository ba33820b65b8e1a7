"""Concept sources for the diffusers host: every embedding format, the kind read from the file, folders and hub ids,
and files that are hostile or made for another model."""

from __future__ import annotations

import os
import pickle

import huggingface_hub
import pytest
import torch
from diffusers_parts import TEXT_WIDTH, load_pipeline, lora_state, saved_pipeline, text_lora_factors
from safetensors.torch import save_file
from weight_files import cd_state, random_cd_weights, random_factors

from alignit.concepts import Concept, SourceKind, SourceSpec
from alignit.errors import ConceptError
from alignit.hosts.diffusers import AlignIT
from alignit.hosts.diffusers.sources import read_source


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {kind: saved_pipeline(kind, root) for kind in ("sd15", "sdxl")}


def spec(path) -> SourceSpec:
    return SourceSpec(SourceKind.EMBEDDING, str(path))


VECTORS = torch.arange(2 * 768, dtype=torch.float32).reshape(2, 768) / 1000


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("a1111.pt", {"string_to_token": {"*": 265}, "string_to_param": {"*": VECTORS}, "name": "x", "step": 100}),
        ("a1111.safetensors", {"emb_params": VECTORS}),
        ("learned_embeds.bin", {"<cat-toy>": VECTORS[0]}),
        ("learned_embeds.safetensors", {"<cat-toy>": VECTORS}),
        ("sdxl.safetensors", {"clip_l": VECTORS, "clip_g": torch.ones(2, 1280)}),
    ],
)
def test_embedding_formats(tmp_path, name, content):
    path = tmp_path / name
    save_file(content, str(path)) if name.endswith(".safetensors") else torch.save(content, path)
    files = read_source(spec(path))
    assert files.kind is SourceKind.EMBEDDING and files.embedding is not None
    if "clip_l" in content:
        assert torch.equal(files.embedding.vectors["clip_l"], VECTORS) and files.embedding.count == 2
    else:
        want = VECTORS[:1] if name == "learned_embeds.bin" else VECTORS
        assert torch.equal(files.embedding.vectors[""], want)


def test_the_kind_is_read_from_the_file(tmp_path, models):
    pipe = load_pipeline(models["sd15"])
    factors = random_factors(pipe.unet)
    for scheme in ("kohya", "peft", "diffusers_old"):
        save_file(lora_state(factors, [text_lora_factors(pipe.text_encoder)], scheme), str(tmp_path / f"{scheme}.safetensors"))
        files = read_source(spec(tmp_path / f"{scheme}.safetensors"))
        assert files.kind is SourceKind.LORA and set(files.lora.kv) == set(factors), scheme
    weights = random_cd_weights(pipe.unet)
    for scheme in ("diffusers", "delta_bin", "compvis"):
        torch.save(cd_state(weights, torch.ones(1, TEXT_WIDTH), scheme), tmp_path / f"{scheme}.ckpt")
        files = read_source(spec(tmp_path / f"{scheme}.ckpt"))
        assert files.kind is SourceKind.CUSTOM_DIFFUSION and set(files.custom_diffusion.kv) == set(weights), scheme
    forced = read_source(SourceSpec(SourceKind.LORA, str(tmp_path / "kohya.safetensors"), 0.5))
    assert forced.lora_weight == 0.5


def test_folders(tmp_path):
    torch.save({"<x>": torch.ones(TEXT_WIDTH)}, tmp_path / "learned_embeds.bin")
    torch.save({"<y>": torch.zeros(TEXT_WIDTH)}, tmp_path / "other.bin")
    assert torch.equal(read_source(spec(tmp_path)).embedding.vectors[""], torch.ones(1, TEXT_WIDTH))
    (tmp_path / "learned_embeds.bin").unlink()
    assert torch.equal(read_source(spec(tmp_path)).embedding.vectors[""], torch.zeros(1, TEXT_WIDTH))
    torch.save({"<z>": torch.zeros(TEXT_WIDTH)}, tmp_path / "third.pt")
    with pytest.raises(ConceptError, match="cannot tell which file.*other.bin, third.pt"):
        read_source(spec(tmp_path))


def test_custom_diffusion_folder_with_its_modifier_token(tmp_path, models):
    """diffusers' example script saves the modifier token beside the weights, as ``<new1>.bin``."""
    pipe = load_pipeline(models["sd15"])
    weights = random_cd_weights(pipe.unet)
    torch.save(cd_state(weights, torch.ones(1, TEXT_WIDTH), "diffusers"), tmp_path / "pytorch_custom_diffusion_weights.bin")
    torch.save({"<new1>": torch.full((TEXT_WIDTH,), 2.0)}, tmp_path / "<new1>.bin")
    files = read_source(spec(tmp_path))
    assert files.kind is SourceKind.CUSTOM_DIFFUSION
    assert torch.equal(files.custom_diffusion.modifier_tokens["<new1>"], torch.full((1, TEXT_WIDTH), 2.0))
    aligned = AlignIT(pipe, [Concept("<new1> cat", "cat", str(tmp_path))])
    assert aligned.sources[0].tokens[0] == 0 and len(aligned.sources[0].tokens) == 2


def test_hub_ids(tmp_path, monkeypatch):
    """A repository id takes its usual file (and lists the repository for it); ``user/repo/file`` takes that file."""
    repo = tmp_path / "hub"
    repo.mkdir()
    torch.save({"<cat-toy>": torch.ones(TEXT_WIDTH)}, repo / "learned_embeds.bin")
    (repo / "README.md").write_text("a concept")
    asked = []

    def download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo_id, **kwargs: sorted(os.listdir(repo)))
    assert read_source(spec("sd-concepts-library/cat-toy")).embedding.count == 1
    assert read_source(spec("someone/concepts/learned_embeds.bin")).embedding.count == 1
    assert asked == [("sd-concepts-library/cat-toy", "learned_embeds.bin"), ("someone/concepts", "learned_embeds.bin")]

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline)
    with pytest.raises(ConceptError, match="no file or folder 'sd-concepts-library/cat-toy', and the Hugging Face hub cannot"):
        read_source(spec("sd-concepts-library/cat-toy"))
    with pytest.raises(ConceptError, match="no file or folder './missing.bin'"):
        read_source(spec("./missing.bin"))


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_hostile_pickles_are_refused_unrun(tmp_path):
    marker = str(tmp_path / "code ran")
    with open(tmp_path / "learned_embeds.bin", "wb") as file:
        pickle.dump({"<x>": Payload(marker)}, file)
    with pytest.raises(ConceptError, match="cannot read learned_embeds.bin"):
        read_source(spec(tmp_path / "learned_embeds.bin"))
    assert not os.path.exists(marker)


def test_sources_made_for_another_model(tmp_path, models):
    sd15, sdxl = load_pipeline(models["sd15"]), load_pipeline(models["sdxl"])
    save_file({"clip_l": torch.ones(1, TEXT_WIDTH), "clip_g": torch.ones(1, TEXT_WIDTH)}, str(tmp_path / "xl.safetensors"))
    torch.save({"<x>": torch.ones(TEXT_WIDTH)}, tmp_path / "one.bin")
    torch.save({"<x>": torch.ones(768)}, tmp_path / "wide.bin")
    with pytest.raises(ConceptError, match="made for SDXL"):
        AlignIT(sd15, [Concept("<x>", "cat", str(tmp_path / "xl.safetensors"))])
    with pytest.raises(ConceptError, match="an SDXL model needs clip_l and clip_g"):
        AlignIT(sdxl, [Concept("<x>", "cat", str(tmp_path / "one.bin"))])
    with pytest.raises(ConceptError, match="768 wide, this text encoder 32"):
        AlignIT(sd15, [Concept("<x>", "cat", str(tmp_path / "wide.bin"))])
    save_file(lora_state(random_factors(sdxl.unet), [], "kohya"), str(tmp_path / "xl_lora.safetensors"))
    with pytest.raises(ConceptError, match="made for another model"):
        AlignIT(sd15, [Concept("ohwx", "cat", str(tmp_path / "xl_lora.safetensors"))])
    torch.save(cd_state(random_cd_weights(sdxl.unet), torch.ones(1, TEXT_WIDTH), "delta_bin"), tmp_path / "delta.bin")
    with pytest.raises(ConceptError, match="an SDXL model needs clip_l and clip_g"):
        AlignIT(sdxl, [Concept("<new1> cat", "cat", str(tmp_path / "delta.bin"))])
    save_file({"x.weight": torch.zeros(2, 2), "y.weight": torch.zeros(2)}, str(tmp_path / "nothing.safetensors"))
    with pytest.raises(ConceptError, match="is not a textual-inversion embedding"):
        AlignIT(sd15, [Concept("<x>", "cat", str(tmp_path / "nothing.safetensors"))])


def test_lycoris_files_are_refused_with_a_message(tmp_path, models):
    """LoHa parts on a cross-attention K/V (kohya names): refused by name, not read as a LoRA without K/V parts."""
    module = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    parts = {f"{module}.hada_w{i}_{ab}": torch.ones(2, 2) for i in (1, 2) for ab in "ab"} | {f"{module}.alpha": torch.tensor(2.0)}
    save_file(parts, str(tmp_path / "loha.safetensors"))
    with pytest.raises(ConceptError, match=r"loha.safetensors' holds LyCORIS modules .*plain LoRA only"):
        AlignIT(load_pipeline(models["sd15"]), [Concept("ohwx", "cat", f"lora:{tmp_path / 'loha.safetensors'}")])
