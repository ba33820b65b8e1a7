"""modules/devices.py: ``autocast()`` (a no-op on the CPU in fp32)."""

import contextlib


def autocast(disable: bool = False):
    return contextlib.nullcontext()
