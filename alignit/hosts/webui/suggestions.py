"""Class-word suggestions in both WebUIs: a concept row (from the accordion's Suggest button or
``POST /alignit/suggest``) ranked against the candidate words with the loaded model (``alignit.suggest``).

The candidates are AlignIT's list and the words of the file named in the setting ``alignit_class_words_file``; the
row's own class word, when it has one, is ranked with them. Their keys are computed once per model and word list
(the cache is dropped when a model loads). The work runs under the WebUI's queue lock, so it never overlaps a
generation (a LoRA's text part hooks the text encoder while the concept is encoded).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from modules import call_queue, shared

from ...concepts import Concept, Options, plain_words
from ...errors import ConceptError, Unsupported
from ...kv import Key, Project
from ...kv_hooks import module_projection
from ...suggest import BatchEncoder, Suggestion, WordKeysCache, candidate_words, suggest
from .flow import Host

log = logging.getLogger("alignit")

WORDS_OPTION = "alignit_class_words_file"
ROUTE = "/alignit/suggest"
TOP = 5
MAX_TOP = 100
FIELDS = ("trigger", "class_word", "source", "strength", "placeholder", "top")

_cache = WordKeysCache()


@dataclass(frozen=True)
class SuggestRequest:
    """A concept row to find class words for, and how many to return."""

    trigger: str
    class_word: str = ""
    source: str = ""
    strength: float = 1.0
    placeholder: str = "*"
    top: int = TOP


def parse_request(body: Any) -> SuggestRequest:
    """A request's JSON body as a SuggestRequest; ConceptError says in one line what is wrong with it."""
    if not isinstance(body, Mapping):
        raise ConceptError(f"the request must be a JSON object with {', '.join(FIELDS)}, not {type(body).__name__}")
    unknown = sorted(map(str, set(body) - set(FIELDS)))
    if unknown:
        raise ConceptError(f"unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    texts = {
        name: body.get(name, "*" if name == "placeholder" else "") for name in ("trigger", "class_word", "source", "placeholder")
    }
    for name, value in texts.items():
        if not isinstance(value, str):
            raise ConceptError(f"'{name}' must be text, not {value!r}")
    if not texts["trigger"].strip():
        raise ConceptError("'trigger' is empty: name the concept's trigger")
    class_word = " ".join(texts["class_word"].split())
    if class_word and not plain_words(class_word):
        raise ConceptError(f"'class_word' {class_word!r} must be plain words (no brackets, colons, '|', '<', '>')")
    strength, top = body.get("strength", 1.0), body.get("top", TOP)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 2.0:
        raise ConceptError(f"'strength' must be a number in [0, 2], not {strength!r}")
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= MAX_TOP:
        raise ConceptError(f"'top' must be a whole number from 1 to {MAX_TOP}, not {top!r}")
    placeholder = texts["placeholder"].strip() or "*"
    return SuggestRequest(texts["trigger"].strip(), class_word, texts["source"].strip(), float(strength), placeholder, top)


def words(class_word: str = "") -> list[str]:
    """The candidates: AlignIT's list, the settings' file, and the row's own class word."""
    extra = str(getattr(shared.opts, WORDS_OPTION, "") or "").strip()
    found = candidate_words(Path(extra).expanduser() if extra else None)
    if class_word and class_word.lower() not in {word.lower() for word in found}:
        found.append(class_word)
    return found


def forget_model(*_: Any) -> None:
    """``on_model_loaded``: the candidates' keys belong to the model they were computed with."""
    _cache.clear()


def key_projection(modules: Mapping[Key, torch.nn.Module]) -> Project:
    """The layers' own projection (``module_projection``) of rows brought to the layer's device and dtype."""
    project = module_projection(modules)

    def on_layer(key: Key, rows: torch.Tensor) -> torch.Tensor:
        weight = getattr(modules[key], "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point():
            rows = rows.to(device=weight.device, dtype=weight.dtype)
        return project(key, rows)

    return on_layer


def run(host: Host, request: SuggestRequest) -> list[Suggestion]:
    """Rank the candidates for the request's concept with the loaded model (ConceptError / Unsupported say why not)."""
    with call_queue.queue_lock, host.grad_mode():
        host.load_model()
        encoder = host.encoder()
        concept = Concept(request.trigger, request.class_word, request.source, request.strength)
        source = host.resolve(concept, encoder, "kv", lambda text: log.warning("AlignIT: %s", text))
        modules = host.cross_attention()
        options = Options(placeholder=request.placeholder)
        model_key = (id(shared.sd_model), shared.opts.CLIP_stop_at_last_layers, shared.opts.emphasis)
        return suggest(
            cast(BatchEncoder, encoder),  # both WebUIs' encoders encode batches of chunks
            source,
            options,
            words(request.class_word),
            modules,
            key_projection(modules),
            top=request.top,
            exclude=request.trigger,
            cache=_cache,
            cache_key=model_key,
        )


def for_row(
    host: Host, trigger: str, class_word: str, source: str, strength: float, placeholder: str
) -> tuple[list[Suggestion], str]:
    """The accordion's Suggest button: the top words for a concept row, or why there are none (one line)."""
    try:
        row = {"trigger": trigger, "class_word": class_word, "source": source, "strength": strength, "placeholder": placeholder}
        return run(host, parse_request(row)), ""
    except (ConceptError, Unsupported) as error:
        return [], " ".join(str(error).split())
    except Exception as error:  # a bug must cost the suggestion, not the UI
        log.exception("AlignIT: suggesting class words")
        return [], f"{type(error).__name__}: {error}"


def respond(host: Host, body: bytes) -> tuple[int, Any]:
    """``POST /alignit/suggest``: (status, JSON content). 200: the ranked ``[{"word", "score"}]``; 422: a request that
    cannot be read; 400: a concept that cannot be used with the loaded model; each error ``{"detail": one line}``."""
    try:
        data = json.loads(body or b"null")
    except ValueError as error:
        return 422, {"detail": f"the request body is not JSON: {error}"}
    try:
        request = parse_request(data)
    except ConceptError as error:
        return 422, {"detail": " ".join(str(error).split())}
    try:
        return 200, [{"word": item.word, "score": item.score} for item in run(host, request)]
    except (ConceptError, Unsupported) as error:
        return 400, {"detail": " ".join(str(error).split())}
    except Exception as error:  # a bug: said in one line, logged in full
        log.exception("AlignIT: suggesting class words")
        return 500, {"detail": f"{type(error).__name__}: {error}"}


def suggestion_labels(found: Sequence[Suggestion]) -> list[str]:
    """What each clickable suggestion shows: the word and its score."""
    return [f"{item.word} · {item.score:.2f}" for item in found]
