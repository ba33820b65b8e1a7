"""Reading weight files safely: safetensors, or torch pickles with ``weights_only=True`` (no code execution)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..errors import ConceptError

T = TypeVar("T")


def load_tensors(path: str | Path) -> dict[str, Any]:
    """The file's contents (nested dicts of tensors for pickles); a ConceptError names the file if it can't be read."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path), device="cpu"))
        # torch.serialization.load, not torch.load: A1111 replaces torch.load with a scanner that refuses files
        # written by torch >= 2.5; weights_only=True is the safe loader in its own right.
        tree = torch.serialization.load(str(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise ConceptError(f"no file {path}") from error
    except Exception as error:  # safetensors, pickle and zip all raise their own types for a corrupt file
        raise ConceptError(f"cannot read {path.name}: {type(error).__name__}: {error}") from error
    if not isinstance(tree, Mapping):
        raise ConceptError(f"cannot read {path.name}: it holds a {type(tree).__name__}, not a dict of tensors")
    return tree


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


def read_cached(reader: Callable[[str], T], path: str | Path) -> T:
    """``reader(path)``, kept while the file's modification time stays the same (a few files at a time)."""
    return _read_cached(reader, str(path), Path(path).stat().st_mtime)


@functools.lru_cache(maxsize=16)
def _read_cached(reader: Callable[[str], Any], path: str, mtime: float) -> Any:
    return reader(path)
