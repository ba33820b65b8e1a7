"""extensions-builtin/Lora/network.py (A1111 v1.10.1): ``NetworkWeights`` (l.12), ``Network`` (l.91: the multipliers
a module reads), ``ModuleType`` (l.106) and ``NetworkModule`` (l.111-219): the parts every module type shares,
``alpha``/``scale``/``dora_scale`` from the weights, ``multiplier()`` (te or unet by the layer's name),
``calc_scale()``, ``apply_weight_decompose`` (DoRA: the merged weight rescaled column-wise to ``dora_scale``) and
``finalize_updown`` (bias, reshape, scale, DoRA, multiplier, in that order). Devices, ``ops`` and the SD3 ``QkvLinear``
case are left out."""

from collections import namedtuple

import torch

NetworkWeights = namedtuple("NetworkWeights", ["network_key", "sd_key", "w", "sd_module"])


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}


class ModuleType:
    def create_module(self, net, weights):
        return None


class NetworkModule:
    def __init__(self, net, weights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        if hasattr(self.sd_module, "weight"):
            self.shape = self.sd_module.weight.shape
        elif isinstance(self.sd_module, torch.nn.MultiheadAttention):
            self.shape = self.sd_module.out_proj.weight.shape
        else:
            self.shape = None
        self.dim = None
        self.bias = weights.w.get("bias")
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None
        self.dora_scale = weights.w.get("dora_scale", None)
        self.dora_norm_dims = len(self.shape) - 1

    def multiplier(self):
        return self.network.te_multiplier if "transformer" in self.sd_key[:20] else self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def apply_weight_decompose(self, updown, orig_weight):
        orig_weight = orig_weight.to(updown.dtype)
        dora_scale = self.dora_scale.to(device=orig_weight.device, dtype=updown.dtype)
        merged_scale1 = updown + orig_weight
        merged_scale1_norm = (
            merged_scale1.transpose(0, 1)
            .reshape(merged_scale1.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(merged_scale1.shape[1], *[1] * self.dora_norm_dims)
            .transpose(0, 1)
        )
        return merged_scale1 * (dora_scale / merged_scale1_norm) - orig_weight

    def finalize_updown(self, updown, orig_weight, output_shape, ex_bias=None):
        if self.bias is not None:
            updown = updown.reshape(self.bias.shape)
            updown += self.bias.to(orig_weight.device, dtype=updown.dtype)
            updown = updown.reshape(output_shape)
        if len(output_shape) == 4:
            updown = updown.reshape(output_shape)
        if orig_weight.size().numel() == updown.size().numel():
            updown = updown.reshape(orig_weight.shape)
        if ex_bias is not None:
            ex_bias = ex_bias * self.multiplier()
        updown = updown * self.calc_scale()
        if self.dora_scale is not None:
            updown = self.apply_weight_decompose(updown, orig_weight)
        return updown * self.multiplier(), ex_bias

    def calc_updown(self, target):
        raise NotImplementedError()
