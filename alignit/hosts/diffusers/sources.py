"""Concept sources for the diffusers host: a file, a folder or a Hugging Face hub id, read by AlignIT's safe loader.

A source is ``PATH``, ``lora:PATH[:WEIGHT]`` or ``cd:PATH``; PATH is a file, a folder, a hub repository
(``sd-concepts-library/cat-toy``) or a file in one (``user/repo/file.safetensors``). Without a prefix the kind is
read from the file: LoRA factors, Custom Diffusion weights, else a textual-inversion embedding. In a folder or
repository the file is the one of the usual names (``learned_embeds``, ``pytorch_lora_weights``,
``pytorch_custom_diffusion_weights``, ``delta.bin``) or its only weight file; Custom Diffusion's modifier tokens
(``<new1>.bin``, as diffusers' example script saves them) are read beside it.

Every file is read with ``alignit.sources.files.load_tensors`` (safetensors, or a pickle through the safe loader), and
the plain customized pipeline gets the tensors read here, never the file: diffusers' own loaders unpickle nothing.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...concepts import Concept, SourceKind, SourceSpec
from ...engine import ConceptSource, concept_tokens
from ...errors import ConceptError
from ...kv import Key, check_fits
from ...kv_hooks import attn2_modules
from ...sources.custom_diffusion import CustomDiffusionDelta, parse_custom_diffusion
from ...sources.embeddings import SDXL_KEYS, Embedding, parse_embedding
from ...sources.files import flatten, load_tensors
from ...sources.lora import LoraFactors, parse_lora
from ...text_lora import text_lora
from .encoder import DiffusersEncoder

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")
USUAL_NAMES = tuple(
    f"{stem}{suffix}"
    for stem in ("learned_embeds", "pytorch_lora_weights", "pytorch_custom_diffusion_weights")
    for suffix in (".safetensors", ".bin")
) + ("delta.bin",)
_MODIFIER_FILE = re.compile(r"^<[^<>/\\]+>\.(bin|safetensors)$")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(/.+)?$")
_LORA_KEY = re.compile(r"lora_(down|up|A|B)\b|\.lora\.(down|up)\.|_lora\.(down|up)\.|^lora_(unet|te\d?)_")
_CD_KEY = re.compile(r"to_[kv]_custom_diffusion|^modifier_token\.")


@dataclass
class SourceFiles:
    """What a concept's source holds, read once: the kind and its parsed parts (the raw LoRA tensors too, for
    diffusers' ``load_lora_weights``)."""

    kind: SourceKind
    name: str
    embedding: Embedding | None = None
    lora: LoraFactors | None = None
    lora_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    lora_weight: float = 1.0
    custom_diffusion: CustomDiffusionDelta | None = None


def _choose(names: list[str], where: str) -> tuple[str, list[str]]:
    """The weight file among ``names`` (a folder's or repository's top level) and its modifier-token files."""
    modifiers = sorted(name for name in names if _MODIFIER_FILE.match(name))
    weights = [name for name in names if name.endswith(WEIGHT_SUFFIXES) and name not in modifiers]
    usual = [name for name in USUAL_NAMES if name in weights]
    if usual:
        return usual[0], modifiers
    if len(weights) == 1:
        return weights[0], modifiers
    if not weights and len(modifiers) == 1:
        return modifiers[0], []
    listed = ", ".join(sorted(weights)) or "none"
    raise ConceptError(f"{where}: cannot tell which file is the concept (weight files: {listed}); name the file")


def _from_hub(source: str) -> list[Path]:
    """The source's files downloaded from the hub (or found in its cache): the weight file, then modifier tokens."""
    from huggingface_hub import hf_hub_download, list_repo_files

    parts = source.split("/")
    repo = "/".join(parts[:2])
    try:
        if len(parts) > 2:
            return [Path(hf_hub_download(repo, "/".join(parts[2:])))]
        main, modifiers = _choose([name for name in list_repo_files(repo) if "/" not in name], f"hub repository {repo}")
        return [Path(hf_hub_download(repo, name)) for name in (main, *modifiers)]
    except ConceptError:
        raise
    except Exception as error:  # offline, no such repository or file, no access: every kind the hub client raises
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConceptError(f"no file or folder '{source}', and the Hugging Face hub cannot provide it: {reason}") from error


def locate(source: str) -> list[Path]:
    """The files of a source: its weight file first, then modifier-token files (ConceptError if none)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        names = [item.name for item in path.iterdir() if item.is_file()]
        main, modifiers = _choose(names, f"folder {path}")
        return [path / name for name in (main, *modifiers)]
    if _HUB_ID.match(source) and not path.exists() and not source.startswith((".", "/", "~")):
        return _from_hub(source)
    raise ConceptError(f"no file or folder '{source}'")


def _kind(tree: Mapping[str, Any]) -> SourceKind:
    keys = list(flatten(tree))
    if any(_CD_KEY.search(key) for key in keys) or isinstance(tree.get("unet"), Mapping):
        return SourceKind.CUSTOM_DIFFUSION
    if isinstance(tree.get("state_dict"), Mapping) and any("attn2.to_" in key for key in tree["state_dict"]):
        return SourceKind.CUSTOM_DIFFUSION
    if any(_LORA_KEY.search(key) for key in keys):
        return SourceKind.LORA
    return SourceKind.EMBEDDING


def read_source(spec: SourceSpec) -> SourceFiles:
    """Locate and read a source; ``spec.kind`` is kept for ``lora:``/``cd:`` sources, read from the file otherwise."""
    paths = locate(spec.name)
    tree = load_tensors(paths[0])
    kind = _kind(tree) if spec.kind is SourceKind.EMBEDDING else spec.kind
    files = SourceFiles(kind, spec.name)
    if kind is SourceKind.LORA:
        files.lora = parse_lora(paths[0].stem, tree)
        files.lora_tensors = {key: value for key, value in flatten(tree).items() if isinstance(value, torch.Tensor)}
        files.lora_weight = spec.weight
    elif kind is SourceKind.CUSTOM_DIFFUSION:
        delta = parse_custom_diffusion(paths[0].stem, tree)
        for path in paths[1:]:
            embedding = parse_embedding(path.stem, load_tensors(path))
            delta.modifier_tokens[path.stem] = next(iter(embedding.vectors.values()))
        files.custom_diffusion = delta
    else:
        files.embedding = parse_embedding(paths[0].stem, tree)
    return files


def embedding_handle(embedding: Embedding, encoder: DiffusersEncoder) -> tuple[torch.Tensor, ...]:
    """The embedding's vectors per text encoder of the pipeline, checked against their widths."""
    widths = encoder.widths
    if len(widths) == 2:
        if set(embedding.vectors) != set(SDXL_KEYS):
            raise ConceptError(
                f"embedding '{embedding.name}' holds one text encoder's vectors; an SDXL model needs clip_l and clip_g"
            )
        vectors = tuple(embedding.vectors[key] for key in SDXL_KEYS)
    elif "" in embedding.vectors:
        vectors = (embedding.vectors[""],)
    else:
        raise ConceptError(f"embedding '{embedding.name}' was made for SDXL (clip_l, clip_g); this pipeline has one text encoder")
    for vector, width in zip(vectors, widths):
        if vector.shape[-1] != width:
            raise ConceptError(
                f"embedding '{embedding.name}' is {vector.shape[-1]} wide, this text encoder {width}: made for another model"
            )
    return vectors


class DiffusersSources:
    """``SourceResolver`` for one pipeline; ``files`` keeps what each resolved concept's source holds (for the plain
    customized pipeline)."""

    def __init__(self, pipe: Any, encoder: DiffusersEncoder):
        self.pipe = pipe
        self.encoder = encoder
        self.modules: dict[Key, torch.nn.Module] = attn2_modules(pipe.unet)
        self.files: dict[Concept, SourceFiles] = {}

    def _read(self, concept: Concept, spec: SourceSpec) -> SourceFiles:
        try:
            files = read_source(spec)
        except ConceptError as error:
            raise ConceptError(f"concept '{concept.trigger}': {error}") from error
        self.files[concept] = files
        return files

    def embedding(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        files = self._read(concept, spec)
        if files.kind is SourceKind.LORA:
            return self._lora(concept, files)
        if files.kind is SourceKind.CUSTOM_DIFFUSION:
            return self._custom_diffusion(concept, files)
        assert files.embedding is not None
        handle = embedding_handle(files.embedding, self.encoder)
        return ConceptSource.embedding(files.embedding.name, files.embedding.count, handle)

    def lora(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        return self._lora(concept, self._read(concept, spec))

    def custom_diffusion(self, concept: Concept, spec: SourceSpec) -> ConceptSource:
        return self._custom_diffusion(concept, self._read(concept, spec))

    def _lora(self, concept: Concept, files: SourceFiles) -> ConceptSource:
        factors = files.lora
        if factors is None:
            raise ConceptError(f"concept '{concept.trigger}': '{files.name}' holds no LoRA factors")
        if factors.kv_parts or factors.text_parts or factors.text_2_parts:
            raise ConceptError(
                f"LoRA '{files.name}' holds LyCORIS modules (LoHa, LoKr, (IA)³, DoRA or full diffs): AlignIT on diffusers "
                "reads plain LoRA only (the WebUIs read these)"
            )
        weight = files.lora_weight
        kv = {key: projection.times(weight) for key, projection in factors.kv.items()}
        parts = [{key: projection.times(weight) for key, projection in part.items()} for part in (factors.text, factors.text_2)]
        patches = [(model, part) for model, part in zip(self.encoder.text_models, parts) if part]
        if len(self.encoder.text_models) == 1 and factors.text_2:
            raise ConceptError(f"LoRA '{files.name}' has a second text encoder's part (SDXL); this pipeline has one")
        if not kv and not patches:
            raise ConceptError(
                f"LoRA '{files.name}' has no attn2 to_k/to_v or text-encoder weights: AlignIT cannot confine it to the concept"
            )
        check_fits(f"LoRA '{files.name}'", kv, self.modules)
        tokens, fixes = concept_tokens(self.encoder, concept.trigger, {})
        return ConceptSource(f"lora:{files.name}", tokens, fixes, text_patch=_text_patch(patches) if patches else None, kv=kv)

    def _custom_diffusion(self, concept: Concept, files: SourceFiles) -> ConceptSource:
        delta = files.custom_diffusion
        if delta is None:
            raise ConceptError(f"concept '{concept.trigger}': '{files.name}' holds no Custom Diffusion weights")
        check_fits(f"Custom Diffusion delta '{files.name}'", delta.kv, self.modules)
        for token, vectors in delta.modifier_tokens.items():
            if vectors.shape[-1] != self.encoder.widths[0]:
                wide, width = vectors.shape[-1], self.encoder.widths[0]
                raise ConceptError(f"'{files.name}': modifier token {token} is {wide} wide, this text encoder {width}")
        tokens, fixes = concept_tokens(self.encoder, concept.trigger, delta.modifier_tokens)
        return ConceptSource(f"cd:{files.name}", tokens, fixes, kv=delta.kv)


def _text_patch(
    patches: Sequence[tuple[torch.nn.Module, Mapping[str, Any]]],
) -> Callable[[], contextlib.AbstractContextManager[None]]:
    """A LoRA's text-encoder parts applied functionally while p' is encoded (SDXL: both encoders)."""

    @contextlib.contextmanager
    def patched() -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for model, factors in patches:
                stack.enter_context(text_lora(model, factors))
            yield

    return patched
