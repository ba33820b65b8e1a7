"""comfy/model_patcher.py: ``ModelPatcher`` with ``model``, ``model_options`` (``transformer_options``), ``patches``
and ``backup`` (shared by clones); ``clone`` (l.287-345: the same model, patch lists copied, ``model_options``
deep-copied, ``backup`` shared); ``is_clone`` (l.346); ``set_model_patch`` / ``set_model_attn2_patch`` (l.409-425:
appended to ``transformer_options["patches"][name]``); ``set_model_attn2_replace`` (l.427 →
``set_model_options_patch_replace``, l.55-74: the dicts copied, the slot ``(block, number)`` or
``(block, number, transformer_index)``); ``add_patches`` (l.557-579: ``(strength_patch, patch, strength_model, offset,
function)`` appended per model key, returns the keys the model has); ``patch_model`` / ``unpatch_model`` (l.814-870:
the patches merged with ``comfy.lora.calculate_weight`` into the shared weights, the originals kept in ``backup``, and
put back)."""

from __future__ import annotations

import copy
import uuid

import torch

from . import lora


def set_model_options_patch_replace(model_options, patch, name, block_name, number, transformer_index=None):
    to = model_options["transformer_options"].copy()
    to["patches_replace"] = to.get("patches_replace", {}).copy()
    to["patches_replace"][name] = to["patches_replace"].get(name, {}).copy()
    block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
    to["patches_replace"][name][block] = patch
    model_options["transformer_options"] = to
    return model_options


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.patches: dict = {}
        self.backup: dict = {}
        self.patches_uuid = uuid.uuid4()
        self.model_options: dict = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model)
        n.patches = {key: patches[:] for key, patches in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.model_options = copy.deepcopy(self.model_options)
        n.backup = self.backup
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        options = set_model_options_patch_replace(self.model_options, patch, "attn2", block_name, number, transformer_index)
        self.model_options = options

    def add_patches(self, patches, strength_patch=1.0, strength_model=1.0):
        model_sd = self.model.state_dict()
        added = []
        for key, patch in patches.items():
            if key in model_sd:
                added.append(key)
                self.patches.setdefault(key, []).append((strength_patch, patch, strength_model, None, None))
        self.patches_uuid = uuid.uuid4()
        return added

    def _parameter(self, key):
        module_name, _, name = key.rpartition(".")
        return self.model.get_submodule(module_name), name

    def patch_model(self):
        with torch.no_grad():
            for key, patches in self.patches.items():
                module, name = self._parameter(key)
                weight = getattr(module, name)
                self.backup.setdefault(key, weight.detach().clone())
                merged = lora.calculate_weight(patches, weight.detach().float().clone(), key)
                weight.copy_(merged.to(weight.dtype))
        return self.model

    def unpatch_model(self):
        with torch.no_grad():
            for key, original in self.backup.items():
                module, name = self._parameter(key)
                getattr(module, name).copy_(original)
        self.backup.clear()
