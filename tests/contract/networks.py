"""extensions-builtin/Lora/networks.py: ``available_network_aliases`` maps a LoRA's name and alias to a
``NetworkOnDisk`` with ``filename`` (network.py:27). Tests fill it with the LoRA files they write."""

available_network_aliases = {}
