"""Counting host-device synchronisations without a GPU: the operators that read a value back to the host or whose
output shape depends on the data (each makes the host wait for the device on CUDA)."""

from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

SYNCING = ("aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::is_nonzero", "aten::unique")


class SyncCounter(TorchDispatchMode):
    """A dispatch mode that counts syncing operators while it is active (it can be entered again and again)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(func.name().startswith(name) for name in SYNCING):
            self.count += 1
        return func(*args, **(kwargs or {}))
