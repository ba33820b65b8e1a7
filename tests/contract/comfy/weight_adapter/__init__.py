"""comfy/weight_adapter: ``LoRAAdapter`` (lora.py 58-230: ``weights = (up, down, alpha, mid, dora_scale, reshape)``
from ``.lora_up/.lora_down``, ``_lora.up/down``, ``.lora_B/.lora_A``, ``.lora.up/down``; ``W += s·(α/r)·up@down``),
``LoHaAdapter`` (loha.py 122-232: ``hada_w1_a/b``, ``hada_w2_a/b``; ``W += s·(α/r)·(w1a@w1b)*(w2a@w2b)``) and the
``adapters`` list (__init__.py 10-17); no mid/DoRA/reshape/CP parts here."""

from __future__ import annotations

import torch

_LORA_NAMES = (
    ("{}.lora_up.weight", "{}.lora_down.weight"),
    ("{}_lora.up.weight", "{}_lora.down.weight"),
    ("{}.lora_B.weight", "{}.lora_A.weight"),
    ("{}.lora.up.weight", "{}.lora.down.weight"),
)


class WeightAdapterBase:
    name = ""

    def __init__(self, loaded_keys, weights):
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        raise NotImplementedError

    def calculate_weight(
        self, weight, key, strength, strength_model, offset, function, intermediate_dtype=None, original_weight=None
    ):
        raise NotImplementedError


class LoRAAdapter(WeightAdapterBase):
    name = "lora"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        loaded_keys = set() if loaded_keys is None else loaded_keys
        for up_name, down_name in _LORA_NAMES:
            up_name, down_name = up_name.format(x), down_name.format(x)
            if up_name in lora:
                loaded_keys.update((up_name, down_name))
                return cls(loaded_keys, (lora[up_name], lora[down_name], alpha, None, dora_scale, None))
        return None

    def calculate_weight(
        self, weight, key, strength, strength_model, offset, function, intermediate_dtype=None, original_weight=None
    ):
        up, down, alpha = self.weights[0].float(), self.weights[1].float(), self.weights[2]
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = torch.mm(up.flatten(start_dim=1), down.flatten(start_dim=1)).reshape(weight.shape)
        weight += function(((strength * scale) * diff).type(weight.dtype))
        return weight


class LoHaAdapter(WeightAdapterBase):
    name = "loha"

    @classmethod
    def load(cls, x, lora, alpha, dora_scale, loaded_keys=None):
        loaded_keys = set() if loaded_keys is None else loaded_keys
        names = [f"{x}.hada_w1_a", f"{x}.hada_w1_b", f"{x}.hada_w2_a", f"{x}.hada_w2_b"]
        if names[0] not in lora:
            return None
        loaded_keys.update(names)
        w1a, w1b, w2a, w2b = (lora[name] for name in names)
        return cls(loaded_keys, (w1a, w1b, alpha, w2a, w2b, None, None, dora_scale))

    def calculate_weight(
        self, weight, key, strength, strength_model, offset, function, intermediate_dtype=None, original_weight=None
    ):
        w1a, w1b, alpha, w2a, w2b = (self.weights[i] for i in range(5))
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        diff = (torch.mm(w1a.float(), w1b.float()) * torch.mm(w2a.float(), w2b.float())).reshape(weight.shape)
        weight += function(((strength * scale) * diff).type(weight.dtype))
        return weight


adapters: list[type[WeightAdapterBase]] = [LoRAAdapter, LoHaAdapter]
