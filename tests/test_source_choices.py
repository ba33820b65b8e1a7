"""What each concept row's Source list holds in both WebUIs: every embedding, LoRA and Custom Diffusion delta the
WebUI has, no empty entry, and on Forge the embeddings before a model is loaded (Forge loads one at the first
generation, and its engines' embedding databases come with it)."""

from types import SimpleNamespace

import forge_flow
import networks
import pytest
import torch
import webui_flow
from modules import sd_hijack, shared, ui_extra_networks_textual_inversion

LISTS = ["lora:a_lora", "lora:b_lora", "cd:delta"]


@pytest.fixture
def folders(tmp_path, monkeypatch):
    aliases = {name: SimpleNamespace(filename=f"{name}.safetensors") for name in ("b_lora", "a_lora")}
    monkeypatch.setattr(networks, "available_network_aliases", aliases)
    (tmp_path / "delta.bin").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a delta")
    monkeypatch.setattr(shared.opts, "alignit_custom_diffusion_dir", str(tmp_path), raising=False)


def register(database, *names):
    for name in names:
        database.register_embedding(sd_hijack.Embedding(torch.zeros(1, 32), name), [hash(name) % 1000])


def test_a1111_lists_its_embedding_database_first(folders, text_model, tokenizer, monkeypatch):
    monkeypatch.setattr(shared, "sd_model", webui_flow.FakeModel(text_model, tokenizer))
    monkeypatch.setattr(sd_hijack.model_hijack, "embedding_db", sd_hijack.EmbeddingDatabase())
    register(sd_hijack.model_hijack.embedding_db, "Zeta", "alpha")
    assert webui_flow.HOST.source_choices() == ["alpha", "Zeta", *LISTS]


def test_forge_lists_the_loaded_engines_embeddings(folders, text_model, tokenizer, monkeypatch):
    model = forge_flow.FakeForgeModel({"clip_l": text_model}, tokenizer, None)
    monkeypatch.setattr(shared, "sd_model", model)
    register(model.text_processing_engine.embeddings, "mine")
    monkeypatch.setattr(ui_extra_networks_textual_inversion, "embedding_db", sd_hijack.EmbeddingDatabase())
    register(ui_extra_networks_textual_inversion.embedding_db, "from_the_page")
    assert forge_flow.HOST.source_choices() == ["mine", *LISTS]


def test_forge_lists_embeddings_before_a_model_is_loaded(folders, monkeypatch):
    monkeypatch.setattr(shared, "sd_model", SimpleNamespace(forge_objects=None))  # sd_models.py:385 FakeInitialModel
    monkeypatch.setattr(ui_extra_networks_textual_inversion, "embedding_db", sd_hijack.EmbeddingDatabase())
    register(ui_extra_networks_textual_inversion.embedding_db, "from_the_page")
    assert forge_flow.HOST.source_choices() == ["from_the_page", *LISTS]


def test_a_model_alignit_does_not_apply_to_lists_no_embedding(folders, monkeypatch):
    flux = SimpleNamespace(forge_objects=SimpleNamespace(), is_sd1=False, is_sd2=False, is_sdxl=False, is_sd3=False)
    monkeypatch.setattr(shared, "sd_model", flux)
    assert forge_flow.HOST.source_choices() == LISTS
