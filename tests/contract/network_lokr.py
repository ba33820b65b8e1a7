"""extensions-builtin/Lora/network_lokr.py: LoKr, ``kron(w1, w2)`` with either factor whole (``lokr_w1``/``lokr_w2``) or
a product (``lokr_w1_a @ lokr_w1_b``, ``lokr_w2_a @ lokr_w2_b``), l.7-64; ``dim`` = rank of the factorised one (l.30-34;
none: scale 1). The CP variant (``lokr_t2``) is left out."""

import network
import torch


class ModuleTypeLokr(network.ModuleType):
    def create_module(self, net, weights):
        has_1 = "lokr_w1" in weights.w or ("lokr_w1_a" in weights.w and "lokr_w1_b" in weights.w)
        has_2 = "lokr_w2" in weights.w or ("lokr_w2_a" in weights.w and "lokr_w2_b" in weights.w)
        if has_1 and has_2:
            return NetworkModuleLokr(net, weights)
        return None


def make_kron(orig_shape, w1, w2):
    return torch.kron(w1, w2.contiguous()).reshape(orig_shape)


class NetworkModuleLokr(network.NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w1, self.w1a, self.w1b = (weights.w.get(k) for k in ("lokr_w1", "lokr_w1_a", "lokr_w1_b"))
        self.dim = self.w1b.shape[0] if self.w1b is not None else self.dim
        self.w2, self.w2a, self.w2b = (weights.w.get(k) for k in ("lokr_w2", "lokr_w2_a", "lokr_w2_b"))
        self.dim = self.w2b.shape[0] if self.w2b is not None else self.dim

    def calc_updown(self, orig_weight):
        w1 = self.w1 if self.w1 is not None else self.w1a @ self.w1b
        w2 = self.w2 if self.w2 is not None else self.w2a @ self.w2b
        w1, w2 = w1.to(orig_weight.device), w2.to(orig_weight.device)
        output_shape = [w1.size(0) * w2.size(0), w1.size(1) * w2.size(1)]
        return self.finalize_updown(make_kron(output_shape, w1, w2), orig_weight, output_shape)
