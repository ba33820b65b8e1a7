"""ComfyUI's ``folder_paths.py`` (v0.8.0, fc0cb10b), the part AlignIT's ComfyUI host calls: ``models_dir`` (l.22),
``supported_pt_extensions`` (l.12), ``folder_names_and_paths`` (``name → ([folders], extensions)``, l.23-53),
``add_model_folder_path`` (l.281: an unknown name gets an empty extension set, i.e. every file),
``get_folder_paths`` (l.299), ``get_full_path`` (l.349: the first folder holding the file, no escape with ``..``) and
``get_filename_list`` (l.418: every file under the folders, recursively, with a listed extension, sorted, ``/``
separated). The tests point ``models_dir`` at a temporary folder with ``use_models_dir``."""

from __future__ import annotations

import os

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
models_dir = ""
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def use_models_dir(path: str) -> None:
    """Test helper (not ComfyUI's): the folders ComfyUI registers at import, under ``path``."""
    global models_dir
    models_dir = path
    folder_names_and_paths.clear()
    for name in ("checkpoints", "loras", "embeddings"):
        folder_names_and_paths[name] = ([os.path.join(path, name)], set(supported_pt_extensions))


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    if folder_name in folder_names_and_paths:
        paths = folder_names_and_paths[folder_name][0]
        if full_folder_path in paths:
            if is_default and paths[0] != full_folder_path:
                paths.remove(full_folder_path)
                paths.insert(0, full_folder_path)
        elif is_default:
            paths.insert(0, full_folder_path)
        else:
            paths.append(full_folder_path)
    else:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())


def get_folder_paths(folder_name: str) -> list[str]:
    return folder_names_and_paths[folder_name][0][:]


def get_full_path(folder_name: str, filename: str) -> str | None:
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")
    for folder in folder_names_and_paths[folder_name][0]:
        full_path = os.path.join(folder, filename)
        if os.path.isfile(full_path):
            return full_path
    return None


def get_filename_list(folder_name: str) -> list[str]:
    folders, extensions = folder_names_and_paths[folder_name]
    found = set()
    for folder in folders:
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in files:
                relative = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
                if not extensions or os.path.splitext(name)[-1].lower() in extensions:
                    found.add(relative)
    return sorted(found)
