"""extensions-builtin/Lora/networks.py: ``module_types`` (l.27-36, the order A1111 tries them in; the norm, GLoRA and
OFT types are left out) and ``available_network_aliases``, which maps a LoRA's name and alias to a ``NetworkOnDisk``
with ``filename`` (network.py:27). Tests fill it with the LoRA files they write."""

import network_full
import network_hada
import network_ia3
import network_lokr
import network_lora

module_types = [
    network_lora.ModuleTypeLora(),
    network_hada.ModuleTypeHada(),
    network_ia3.ModuleTypeIa3(),
    network_lokr.ModuleTypeLokr(),
    network_full.ModuleTypeFull(),
]

available_network_aliases = {}
