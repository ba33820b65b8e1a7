"""The AUTOMATIC1111 and Forge WebUIs: one generation flow (``flow``, A1111's prompt parser and hook order, which
Forge keeps), the script's arguments and infotext (``args``), and per WebUI its text encoder, sources and K/V
mechanism (``a1111*``: forward hooks on the ldm UNet; ``forge*``: attn2 patches on a cloned UNet patcher)."""
