"""backend/patcher/base.py: ``ModelPatcher`` with ``model``, ``model_options`` (l.59), ``clone`` (l.79-84: the same
model, ``model_options`` deep-copied), ``set_model_patch`` (l.161-165: appends to a list), and
``set_model_patch_replace`` (l.167 → l.15-34: copies the dicts, one slot per ``(block, id[, transformer index])``);
``set_model_attn2_patch`` / ``set_model_attn2_replace`` (l.173-180)."""

import copy


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        n = ModelPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_patch(self, patch, name):
        to = self.model_options["transformer_options"]
        to.setdefault("patches", {})
        to["patches"][name] = to["patches"].get(name, []) + [patch]

    def set_model_patch_replace(self, patch, name, block_name, number, transformer_index=None):
        to = dict(self.model_options["transformer_options"])
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"][name] = dict(to["patches_replace"].get(name, {}))
        block = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        to["patches_replace"][name][block] = patch
        self.model_options["transformer_options"] = to

    def set_model_attn2_patch(self, patch):
        self.set_model_patch(patch, "attn2_patch")

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        self.set_model_patch_replace(patch, "attn2", block_name, number, transformer_index)
