"""Reading weight files safely: safetensors, or torch pickles through :mod:`.safe_pickle` (no code execution)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import ConceptError
from . import safe_pickle

T = TypeVar("T")


def load_tensors(path: str | Path) -> Mapping[str, Any]:
    """The file's contents (nested dicts of tensors for pickles); a ConceptError names the file if it can't be read."""
    path = Path(path)
    try:
        # Not torch.load (A1111 replaces it with a scanner that refuses files from torch >= 2.5, Forge wraps it) nor
        # weights_only=True (unsafe on the torch the WebUIs ship): a loader of our own, see safe_pickle.
        tree = _read_safetensors(path) if path.suffix == ".safetensors" else safe_pickle.load(path)
    except FileNotFoundError as error:
        raise ConceptError(f"no file {path}") from error
    except safe_pickle.RefusedFile as error:
        raise ConceptError(_one_line(f"cannot read {path.name}: {error}")) from error
    except Exception as error:  # safetensors raises its own types for a corrupt file
        raise ConceptError(_one_line(f"cannot read {path.name}: {type(error).__name__}: {error}")) from error
    if not isinstance(tree, Mapping):
        raise ConceptError(f"cannot read {path.name}: it holds a {type(tree).__name__}, not a dict of tensors")
    return tree


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # safe_open, not safetensors.torch.load_file: Forge wraps load_file and moves a file it fails to read to
    # *.corrupted. The tensors are copied out of the file's memory map so that none keeps the file mapped.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as file:
        return {key: file.get_tensor(key).clone() for key in file.keys()}


def _one_line(message: str) -> str:
    return " ".join(message.split())


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a': {'b': t}}`` → ``{'a.b': t}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


CACHE_BYTES = 1 << 30
"""What the file cache may hold: the tensors of what was read (a LoRA's K/V and text parts, not whole files)."""

_cache: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()


def tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value``: a tensor, a dataclass, a mapping or a sequence of them, nested."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(tensor_bytes(getattr(value, field.name)) for field in dataclasses.fields(value))
    if isinstance(value, Mapping):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    return 0


def read_cached(reader: Callable[[str], T], path: str | Path) -> T:
    """``reader(path)``, kept while the file stays the same (modification time and size), least recently used first
    out once the cache holds more than ``CACHE_BYTES`` of tensors."""
    stat = Path(path).stat()
    key = (reader, str(path), stat.st_mtime_ns, stat.st_size)
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key][0]
    value = reader(str(path))
    size = tensor_bytes(value)
    if size <= CACHE_BYTES:
        _cache[key] = (value, size)
        while sum(size for _, size in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return value
