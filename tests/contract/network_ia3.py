"""extensions-builtin/Lora/network_ia3.py: (IA)³, ``W * w`` with ``w`` on the output rows, or on the input columns when
``on_input`` (l.19-30)."""

import network


class ModuleTypeIa3(network.ModuleType):
    def create_module(self, net, weights):
        if all(x in weights.w for x in ["weight"]):
            return NetworkModuleIa3(net, weights)
        return None


class NetworkModuleIa3(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w = weights.w["weight"]
        self.on_input = weights.w["on_input"].item()

    def calc_updown(self, orig_weight):
        w = self.w.to(orig_weight.device)
        output_shape = [w.size(0), orig_weight.size(1)]
        if self.on_input:
            output_shape.reverse()
        else:
            w = w.reshape(-1, 1)
        return self.finalize_updown(orig_weight * w, orig_weight, output_shape)
