from __future__ import annotations

import sys

import pytest
import torch
from clip_parts import clip_text_model, clip_tokenizer, open_clip_text_model, small_clip_text_model
from hf_clip import HFClipEncoder

HIDDEN = 32


@pytest.fixture(scope="session")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="session")
def text_model():
    return small_clip_text_model(hidden=HIDDEN)


@pytest.fixture
def encoder(text_model, tokenizer) -> HFClipEncoder:
    return HFClipEncoder(text_model, tokenizer)


@pytest.fixture
def vectors():
    """Embedding vectors of a given count, reproducible per count."""

    def make(count: int, seed: int = 1) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 100 + count)
        return torch.randn(count, HIDDEN, generator=generator)

    return make


@pytest.fixture(scope="session")
def model_l():
    """SDXL's CLIP-L at its real width, one layer."""
    return clip_text_model(768, layers=1, heads=12, seed=6)


@pytest.fixture(scope="session")
def model_g():
    """SDXL's OpenCLIP-G at its real width, one layer, as Forge holds it (a transformers CLIP text model)."""
    return clip_text_model(1280, layers=1, heads=20, seed=7)


@pytest.fixture(scope="session")
def open_clip_g():
    """SDXL's OpenCLIP-G at its real width as A1111 holds it (an open_clip text tower read at its penultimate layer),
    two layers."""
    return open_clip_text_model(1280, layers=2, heads=20, seed=7)


def pytest_terminal_summary(terminalreporter):
    """The WebUIs the integration tests started, with commit, model family and checkpoint (tests/webui_server.py)."""
    server = sys.modules.get("webui_server")
    for line in getattr(server, "STARTED", []):
        terminalreporter.write_line(f"real WebUI: {line}")
