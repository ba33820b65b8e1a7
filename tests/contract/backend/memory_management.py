"""backend/memory_management.py:693 ``load_model_gpu(model)``: loads a patcher's model (merging its LoRA patches).
The contract records the calls."""

loaded = []


def load_model_gpu(model):
    loaded.append(model)
