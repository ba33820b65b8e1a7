"""comfy/model_management.py ``load_model_gpu`` (l.707 → ``load_models_gpu``, l.621-705): loading a patcher first
detaches the loaded patchers of the same model (``is_clone``, l.658-666) and then merges the patcher's own weight patches
into the shared weights, keeping the originals in its ``backup`` (``ModelPatcher.load``/``patch_weight_to_device``,
model_patcher.py 614-640, 687). The contract restores the detached clone's weights at once (the real one restores them
when the next patcher loads) and records the loads."""

from __future__ import annotations

loaded: list = []
current: list = []


def load_model_gpu(model):
    loaded.append(model)
    for other in [m for m in current if m is not model and model.is_clone(m)]:
        other.unpatch_model()
        current.remove(other)
    if model not in current:
        model.patch_model()
        current.append(model)
