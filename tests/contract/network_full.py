"""extensions-builtin/Lora/network_full.py: a full ``diff`` (and ``diff_b``, returned as the bias delta), l.4-29."""

import network


class ModuleTypeFull(network.ModuleType):
    def create_module(self, net, weights):
        if all(x in weights.w for x in ["diff"]):
            return NetworkModuleFull(net, weights)
        return None


class NetworkModuleFull(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.weight = weights.w.get("diff")
        self.ex_bias = weights.w.get("diff_b")

    def calc_updown(self, orig_weight):
        ex_bias = self.ex_bias.to(orig_weight.device) if self.ex_bias is not None else None
        return self.finalize_updown(self.weight.to(orig_weight.device), orig_weight, self.weight.shape, ex_bias)
