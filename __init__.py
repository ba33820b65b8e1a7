"""AlignIT as a ComfyUI custom node pack: ComfyUI imports this file from ``custom_nodes/<this checkout>``. The WebUIs
never import it (they run ``scripts/alignit.py``), nor does the code (``alignit`` is the package)."""

import sys

# ComfyUI imports this file as a package, after its own folder_paths. pytest imports it too, as the package of the
# tests' root folder (or as a plain module when the folder's name is no identifier), where ComfyUI is not loaded.
if __package__ and "folder_paths" in sys.modules:
    from .alignit.hosts.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
