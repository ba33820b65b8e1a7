"""The end-to-end cases (webui_cases.py) on a real AUTOMATIC1111 v1.10 with an SDXL checkpoint, through its API.

Skipped unless ``ALIGNIT_A1111_DIR`` names an A1111 folder and ``ALIGNIT_A1111_SDXL_ARGS`` gives the launch arguments
that load an SDXL checkpoint (``--ckpt sdxl.safetensors``; the tests start it with ``--no-half``, float32 on the CPU:
about 16 GB). With random weights, use a checkpoint made by ``tools/random_checkpoint.py sdxl`` (its zero-initialised
UNet layers filled, so that images depend on their prompt); the test summary says how the checkpoint was made. The
test sources are SDXL's: an embedding with ``clip_l`` and ``clip_g`` vectors, LoRAs over the 70 cross-attention layers
(2048-wide context) with text parts for CLIP-L (``lora_te1_``) and OpenCLIP-G (``lora_te2_``, applied to p' through
the open_clip tower's attention), LyCORIS files formed by A1111's own network modules, a Custom Diffusion delta
(without a modifier token: those are refused on SDXL), and SD1.5 sources that must be refused.
"""

import os

import pytest
from test_a1111_integration import CPU, hires_extra, webui_name  # noqa: F401 - the fixtures
from webui_cases import *  # noqa: F403 - the shared end-to-end cases
from webui_server import webui_fixture

SDXL_ARGS = os.environ.get("ALIGNIT_A1111_SDXL_ARGS")
pytestmark = pytest.mark.skipif(
    not (os.environ.get("ALIGNIT_A1111_DIR") and SDXL_ARGS), reason="ALIGNIT_A1111_DIR and ALIGNIT_A1111_SDXL_ARGS are not set"
)


# A1111's default way of applying a LoRA (a "full"-scope concept's, or a <lora:…> tag) first copies every weight of the
# model it touches, which is every weight: another 13 GB for an SDXL model in float32, more than this machine has. Its
# other way, "Lora/Networks: use old method", adds each network in the layer's forward and copies nothing but the
# OpenCLIP-G attention weights; the tests set it for the run (restored afterwards).
webui = webui_fixture("ALIGNIT_A1111", CPU, SDXL_ARGS, family="sdxl", options={"lora_functional": True})
