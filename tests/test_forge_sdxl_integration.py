"""The end-to-end cases (webui_cases.py) on a real Forge with an SDXL checkpoint, through its API.

Skipped unless ``ALIGNIT_FORGE_DIR`` names a Forge folder and ``ALIGNIT_FORGE_SDXL_ARGS`` gives the launch arguments
that load an SDXL checkpoint (``--ckpt sdxl.safetensors``, and ``--unet-in-fp16 --clip-in-fp16`` to halve the
memory on a CPU); with random weights, a checkpoint made by ``tools/random_checkpoint.py sdxl`` (its zero-initialised
UNet layers filled, so that images depend on their prompt; the test summary says how the checkpoint was made). The
test sources are SDXL's: an embedding with ``clip_l`` and ``clip_g`` vectors, LoRAs over the
70 cross-attention layers (2048-wide context) with text parts for both encoders, a Custom Diffusion delta.
"""

import os

import pytest
from test_forge_integration import CPU, hires_extra, webui_name  # noqa: F401 - the fixtures
from webui_cases import *  # noqa: F403 - the shared end-to-end cases
from webui_server import webui_fixture

SDXL_ARGS = os.environ.get("ALIGNIT_FORGE_SDXL_ARGS")
pytestmark = pytest.mark.skipif(
    not (os.environ.get("ALIGNIT_FORGE_DIR") and SDXL_ARGS), reason="ALIGNIT_FORGE_DIR and ALIGNIT_FORGE_SDXL_ARGS are not set"
)


webui = webui_fixture("ALIGNIT_FORGE", CPU, SDXL_ARGS, family="sdxl")
