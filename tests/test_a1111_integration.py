"""End to end against a real AUTOMATIC1111 WebUI (v1.10), started here, through its API (cases: webui_cases.py).

Skipped unless ``ALIGNIT_A1111_DIR`` names a WebUI folder that starts offline on the CPU. ``ALIGNIT_A1111_PYTHON``
is the Python to start it with (default: the folder's ``venv/bin/python``), ``ALIGNIT_A1111_ARGS`` adds launch
arguments (a ``--ckpt`` for instance), ``ALIGNIT_A1111_LOG`` keeps the server's log.
"""

import os
from pathlib import Path

import pytest
from webui_cases import *  # noqa: F403 - the shared end-to-end cases
from webui_server import running_webui

WEBUI = os.environ.get("ALIGNIT_A1111_DIR")
pytestmark = pytest.mark.skipif(not WEBUI, reason="ALIGNIT_A1111_DIR is not set")
CPU = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--use-cpu", "all", "--no-half", "--disable-nan-check"]


@pytest.fixture(scope="module")
def webui(tmp_path_factory):
    folder = Path(WEBUI)
    python = os.environ.get("ALIGNIT_A1111_PYTHON", str(folder / "venv" / "bin" / "python"))
    log = Path(os.environ.get("ALIGNIT_A1111_LOG", tmp_path_factory.mktemp("a1111") / "server.log"))
    with running_webui(folder, python, CPU + os.environ.get("ALIGNIT_A1111_ARGS", "").split(), log) as url:
        yield url


@pytest.fixture
def hires_extra():
    return {}
