"""End to end against a real Stable Diffusion WebUI Forge, started here, through its API (cases: webui_cases.py).

Skipped unless ``ALIGNIT_FORGE_DIR`` names a Forge folder that starts offline on the CPU. ``ALIGNIT_FORGE_PYTHON``
is the Python to start it with (default: the folder's ``venv/bin/python``), ``ALIGNIT_FORGE_ARGS`` adds launch
arguments (a ``--ckpt`` for instance), ``ALIGNIT_FORGE_LOG`` keeps the server's log. With random weights, use a
checkpoint made by ``tools/random_checkpoint.py sd15`` (see test_a1111_integration.py); the test summary names the
WebUI's commit, the model family and how the checkpoint was made.

On Forge the cases also show: p' goes through Forge's own text engines (its ``tokenize_line`` agrees with AlignIT's
layout), the K/V patches on the cloned UNet meet the concept rows in every layer under Forge's sampler (its
``cond_or_uncond`` batching), a LoRA with diffusers module names is mapped by Forge's own key maps, and the patched
clone does not outlive the generation (plain images before and after are byte-identical).
"""

import os

import pytest
from webui_cases import *  # noqa: F403 - the shared end-to-end cases
from webui_server import webui_fixture

pytestmark = pytest.mark.skipif(not os.environ.get("ALIGNIT_FORGE_DIR"), reason="ALIGNIT_FORGE_DIR is not set")
CPU = ["--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--always-cpu", "--skip-version-check"]


webui = webui_fixture("ALIGNIT_FORGE", CPU)


@pytest.fixture
def hires_extra():
    return {"hr_additional_modules": ["Use same choices"]}  # processing.py:1405 fails on None


@pytest.fixture
def webui_name():
    return "forge"
