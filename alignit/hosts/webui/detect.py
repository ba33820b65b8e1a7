"""Which WebUI AlignIT runs in: Forge (its ``backend`` package and ``modules_forge``) or A1111."""

from __future__ import annotations

import importlib.util


def is_forge() -> bool:
    return importlib.util.find_spec("modules_forge") is not None and importlib.util.find_spec("backend") is not None


def current_host():
    """The host adapter for the running WebUI (imported here: each imports its own WebUI's modules)."""
    if is_forge():
        from .forge import ForgeHost

        return ForgeHost()
    from .a1111 import A1111Host

    return A1111Host()
