"""End to end against a real AUTOMATIC1111 WebUI (v1.10), started here, through its API (cases: webui_cases.py).

Skipped unless ``ALIGNIT_A1111_DIR`` names a WebUI folder that starts offline on the CPU. ``ALIGNIT_A1111_PYTHON``
is the Python to start it with (default: the folder's ``venv/bin/python``), ``ALIGNIT_A1111_ARGS`` adds launch
arguments (a ``--ckpt`` for instance), ``ALIGNIT_A1111_LOG`` keeps the server's log. With random weights, use a
checkpoint made by ``tools/random_checkpoint.py sd15``: a plain random ldm UNet outputs 0 (zero-initialised output
layers) and its images ignore the prompt, so "on and off differ" and "off equals plain" would mean nothing; the tool
fills those layers. The test summary names the WebUI's commit, the model family and how the checkpoint was made.
"""

import os

import pytest
from webui_cases import *  # noqa: F403 - the shared end-to-end cases
from webui_server import webui_fixture

pytestmark = pytest.mark.skipif(not os.environ.get("ALIGNIT_A1111_DIR"), reason="ALIGNIT_A1111_DIR is not set")
CPU = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--disable-nan-check"]


webui = webui_fixture("ALIGNIT_A1111", CPU)


@pytest.fixture
def hires_extra():
    return {}


@pytest.fixture
def webui_name():
    return "a1111"
