"""modules/processing.py:819 ``process_images(p) -> Processed`` (A1111; Forge 815): one whole generation of ``p``
with its scripts. Here it runs the test flow (``webui_flow.generate``) in the order of the WebUI the test drives,
which sets ``runner``."""

from collections.abc import Callable
from typing import Any

runner: Callable[[Any], Any] | None = None


def process_images(p):
    assert runner is not None, "no WebUI flow is running"
    return runner(p)
