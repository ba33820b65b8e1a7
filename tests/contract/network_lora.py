"""extensions-builtin/Lora/network_lora.py: ``ModuleTypeLora`` (l.9: ``lora_up``/``lora_down``, or ``lora_A``/``lora_B``
renamed) and ``NetworkModuleLora.calc_updown`` (l.71-86: ``up @ down``, then ``finalize_updown``; DoRA through
``dora_scale``). The linear case only: the real one copies the factors into ``nn.Linear`` layers first (l.34-69)."""

import lyco_helpers
import network


class ModuleTypeLora(network.ModuleType):
    def create_module(self, net, weights):
        if all(x in weights.w for x in ["lora_up.weight", "lora_down.weight"]):
            return NetworkModuleLora(net, weights)
        if all(x in weights.w for x in ["lora_A.weight", "lora_B.weight"]):
            w = weights.w.copy()
            weights.w.clear()
            weights.w.update({"lora_up.weight": w["lora_B.weight"], "lora_down.weight": w["lora_A.weight"]})
            return NetworkModuleLora(net, weights)
        return None


class NetworkModuleLora(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up = weights.w["lora_up.weight"].reshape(weights.w["lora_up.weight"].shape[0], -1)
        self.down = weights.w["lora_down.weight"].reshape(weights.w["lora_down.weight"].shape[0], -1)
        self.dim = weights.w["lora_down.weight"].shape[0]

    def calc_updown(self, orig_weight):
        up, down = self.up.to(orig_weight.device), self.down.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        updown = lyco_helpers.rebuild_conventional(up, down, output_shape, self.network.dyn_dim)
        return self.finalize_updown(updown, orig_weight, output_shape)
