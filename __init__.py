"""AlignIT as a ComfyUI custom node pack: ComfyUI imports this file from ``custom_nodes/<this checkout>``. The WebUIs
never import it (they run ``scripts/alignit.py``), nor do the tests (``alignit`` is the package)."""

from .alignit.hosts.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
