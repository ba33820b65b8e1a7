"""The concepts to evaluate: CustomConcept101's ``dataset.json`` as published, or a small YAML of our own.

A prompt is a template in CustomConcept101's form: ``{}`` stands for the concept. The generated image gets the
concept's trigger there (as the AlignIT paper writes "a <sks> dancing in front of times square"); the text-alignment
score reads the same template with the class word ("a cat dancing in front of times square").

Our YAML (paths relative to the file; a source that is no file there is passed on as it is, e.g. a hub id)::

    concepts:
      - name: cat                   # letters, digits, '.', '_', '-'; names the output folders
        source: embeddings/cat.safetensors
        trigger: <new1>
        class_word: cat
        strength: 1.0               # optional
        references: benchmark_dataset/pet_cat1
        prompts: prompts/cat.txt    # a prompt file (one template a line) or a list of templates

CustomConcept101's ``dataset.json`` (a list of ``instance_prompt``, ``class_prompt``, ``instance_data_dir``,
``prompt_filename``; paths relative to the file) names no customized model: each concept's source is the file in
``sources`` whose stem is the concept's name (the folder name of ``instance_data_dir``, e.g. ``pet_cat1``), and its
trigger is the ``<...>`` token of ``instance_prompt``. Concepts without a source file there are left out.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import InputError

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tiff", ".JPG")
"""The reference-image extensions CustomConcept101's evaluate.py reads (case-sensitive, as there)."""

SOURCE_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_MODIFIER = re.compile(r"<[^<>\s]+>")


@dataclass(frozen=True)
class EvalConcept:
    """One concept to evaluate; ``prompts`` are templates with ``{}`` for the concept."""

    name: str
    source: str
    trigger: str
    class_word: str
    references: Path
    prompts: tuple[str, ...]
    strength: float = 1.0

    def prompt(self, template: str) -> str:
        """The generation prompt: the template with the trigger."""
        return template.replace("{}", self.trigger)

    def text_prompt(self, template: str) -> str:
        """The prompt the text alignment is measured against: the template with the class word."""
        return template.replace("{}", self.class_word)

    def reference_images(self) -> list[Path]:
        return sorted(path for path in self.references.iterdir() if path.name.endswith(REFERENCE_SUFFIXES))


def read_prompt_file(path: Path) -> tuple[str, ...]:
    """A CustomConcept101 prompt file: one template a line, blank lines ignored."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise InputError(f"cannot read the prompt file {path}: {error.strerror}") from error
    return tuple(line.strip() for line in lines if line.strip())


def load_concepts(path: str | Path, sources: str | Path | None = None) -> list[EvalConcept]:
    """Read a concepts file (YAML of our own, or CustomConcept101's dataset.json with ``sources``); raise InputError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read {path}: {error.strerror}") from error
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{path.name} is not valid JSON: {error}") from error
        if sources is None:
            raise InputError(f"{path.name} is CustomConcept101's dataset file: pass --sources DIR with each concept's file")
        concepts = _from_customconcept101(data, path.parent, Path(sources))
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise InputError(f"{path.name} is not valid YAML: {str(error).splitlines()[0]}") from error
        concepts = _from_yaml(data, path.parent)
    return _checked(concepts, path)


def _from_customconcept101(data: Any, root: Path, sources: Path) -> list[EvalConcept]:
    if not isinstance(data, list) or not all(isinstance(entry, Mapping) for entry in data):
        raise InputError("a CustomConcept101 dataset file is a list of single concepts (not dataset_multiconcept.json)")
    if not sources.is_dir():
        raise InputError(f"--sources {sources} is not a folder")
    concepts = []
    for number, entry in enumerate(data, 1):
        missing = [key for key in ("instance_prompt", "class_prompt", "instance_data_dir", "prompt_filename") if key not in entry]
        if missing:
            raise InputError(f"entry {number} lacks {', '.join(missing)}")
        references = root / entry["instance_data_dir"]
        name = references.name
        source = next((path for path in (sources / f"{name}{suffix}" for suffix in SOURCE_SUFFIXES) if path.is_file()), None)
        if source is None:
            continue
        modifier = _MODIFIER.search(entry["instance_prompt"])
        if modifier is None:
            raise InputError(f"entry {number}: no <token> in its instance_prompt {entry['instance_prompt']!r}")
        concepts.append(
            EvalConcept(
                name=name,
                source=str(source),
                trigger=modifier.group(0),
                class_word=str(entry["class_prompt"]),
                references=references,
                prompts=read_prompt_file(root / entry["prompt_filename"]),
            )
        )
    if not concepts:
        raise InputError(f"no concept of the dataset file has its source file (NAME.safetensors, .bin, .pt) in {sources}")
    return concepts


def _from_yaml(data: Any, root: Path) -> list[EvalConcept]:
    entries = data.get("concepts") if isinstance(data, Mapping) else None
    if not isinstance(entries, list) or not entries:
        raise InputError("the concepts file needs a non-empty list under 'concepts:'")
    concepts = []
    for number, entry in enumerate(entries, 1):
        if not isinstance(entry, Mapping):
            raise InputError(f"concept {number} is not a mapping")
        missing = [key for key in ("name", "source", "trigger", "class_word", "references", "prompts") if not entry.get(key)]
        if missing:
            raise InputError(f"concept {number} lacks {', '.join(missing)}")
        source = str(entry["source"])
        if (root / source).is_file():
            source = str(root / source)
        try:
            strength = float(entry.get("strength", 1.0))
        except (TypeError, ValueError) as error:
            raise InputError(f"concept {entry['name']}: strength must be a number") from error
        concepts.append(
            EvalConcept(
                name=str(entry["name"]),
                source=source,
                trigger=str(entry["trigger"]).strip(),
                class_word=" ".join(str(entry["class_word"]).split()),
                references=root / str(entry["references"]),
                prompts=_prompts(entry["prompts"], root, str(entry["name"])),
                strength=strength,
            )
        )
    return concepts


def _prompts(value: Any, root: Path, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return read_prompt_file(root / value)
    if isinstance(value, Sequence) and all(isinstance(item, str) for item in value):
        return tuple(item.strip() for item in value if item.strip())
    raise InputError(f"concept {name}: prompts must be a prompt file or a list of strings")


def _checked(concepts: list[EvalConcept], path: Path) -> list[EvalConcept]:
    names = [concept.name for concept in concepts]
    for concept in concepts:
        if not _NAME.match(concept.name):
            raise InputError(f"concept name {concept.name!r}: use letters, digits, '.', '_' and '-' only")
        if names.count(concept.name) > 1:
            raise InputError(f"concept name {concept.name!r} appears twice in {path.name}")
        if not concept.prompts:
            raise InputError(f"concept {concept.name}: no prompts")
        if without := [prompt for prompt in concept.prompts if "{}" not in prompt]:
            raise InputError(f"concept {concept.name}: the prompt {without[0]!r} has no {{}} for the concept")
        if not concept.references.is_dir():
            raise InputError(f"concept {concept.name}: the reference folder {concept.references} does not exist")
        if not concept.reference_images():
            kinds = ", ".join(REFERENCE_SUFFIXES)
            raise InputError(f"concept {concept.name}: no reference image ({kinds}) in {concept.references}")
    return concepts
