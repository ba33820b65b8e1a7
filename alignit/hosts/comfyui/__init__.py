"""ComfyUI (v0.8.0) as an AlignIT host: the checkout cloned into ``custom_nodes/`` is a node pack (the root
``__init__.py`` imports ``nodes``). ``layout`` reads where the class words land from ComfyUI's own tokenizer,
``encoder`` encodes p' through ComfyUI's CLIP, ``sources`` finds and reads concept files, ``attention`` puts the K/V
rewriting on a MODEL clone as ``attn2`` patches, ``flow`` is one run of AlignIT Text Encode, ``nodes`` the nodes."""
