"""AlignIT as a ComfyUI custom node pack: ComfyUI imports this file from ``custom_nodes/<this checkout>``. The WebUIs
never import it (they run ``scripts/alignit.py``), nor does the code (``alignit`` is the package)."""

# ComfyUI imports this file as the package of its folder. pytest imports it too, as the package of the tests' root
# folder, and as a plain module when that folder's name is no identifier (a checkout in "alignit-main"): no nodes then.
if __package__:
    from .alignit.hosts.comfyui.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
