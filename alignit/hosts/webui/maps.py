"""The attention maps in a WebUI generation (both WebUIs), called from ``flow``'s hooks.

- ``start`` (``process``): the option is read; with "compare", a copy of ``p`` is kept for the plain run.
- ``plan_batch`` (``process_batch``, after AlignIT has rewritten the prompts): each image's words, and per AND part
  the schedule of its prompt with the words marked, laid out and checked against the WebUI's own layout.
- ``install`` (``process_before_every_sampling``, before AlignIT's K/V mechanism): the conditioning the pass will
  sample (AlignIT's splice included) with each row's word, and the host's hooks or patches. None when the option is off.
- ``collect`` (``postprocess_batch``): the hooks come off; each image's maps are summed and kept with its image.
- ``show`` (``postprocess``): with "compare", the same generation again with AlignIT off and the triggers kept (a
  nested ``process_images`` on the copy, maps on); the pictures go to the gallery after the images.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from modules import images as webui_images
from modules import processing, shared

from ... import map_pictures
from ...attention_maps import (
    CondEntry,
    MapRecorder,
    Word,
    columns,
    default_words,
    mark_words,
    normalised,
    parse_words,
    row_words,
    spliced_row_words,
)
from ...concepts import Concept, Options
from ...engine import TextEncoder
from ...errors import LayoutMismatch, Unsupported
from ...layout import Chunk, layout_prompt
from ...prompt import rewrite_prompt, strip_markers
from .args import MapSettings

log = logging.getLogger("alignit")

MAPS_ATTRIBUTE = "alignit_maps"
NESTED_ATTRIBUTE = "alignit_plain_run"  # set on the copy of ``p`` that renders "compare"'s plain run
COLUMNS = ("AlignIT", "without AlignIT")


class MapsMechanism(Protocol):
    """What feeds a ``MapRecorder`` during one sampling pass."""

    error: str | None

    def remove(self) -> None: ...


Schedule = list[tuple[int, str]]  # [(end_at_step, marked text)] of one AND part


@dataclass
class ItemPlan:
    """One image's words, which concepts AlignIT applied in its prompt, and its AND parts' word-marked schedules."""

    words: list[Word]
    applied: frozenset[int]
    first: list[Schedule] | None = None
    hires: list[Schedule] | None = None

    def captions(self, concepts: Sequence[Concept]) -> list[str]:
        return [word.caption(concepts, self.applied) for word in self.words]


@dataclass
class ImageMaps:
    """One image's maps (words, H, W; sums as defined), the words, their captions and the image."""

    words: list[Word]
    captions: list[str]
    maps: torch.Tensor
    image: Any = None  # PIL image


@dataclass
class MapSession:
    """The maps of one ``p``."""

    host: Any
    encoder: TextEncoder
    settings: MapSettings
    concepts: tuple[Concept, ...]  # the concept rows, as the words name them
    options: Options
    plain: Any = None  # the copy of ``p`` for "compare"
    nested: bool = False  # this is "compare"'s plain run
    items: list[ItemPlan | None] = field(default_factory=list)
    recorder: MapRecorder | None = None
    mechanism: MapsMechanism | None = None
    results: list[ImageMaps] = field(default_factory=list)
    layouts: dict[str, list[int | None]] = field(default_factory=dict)


def _plain_copy(p: Any) -> Any:
    """A copy of ``p`` as it is before any batch, for the plain run (its containers its own)."""
    plain = copy.copy(p)
    for name in ("extra_generation_params", "override_settings", "comments"):
        value = getattr(p, name, None)
        if isinstance(value, dict):
            setattr(plain, name, {key: item for key, item in value.items() if not str(key).startswith("AlignIT")})
    setattr(plain, NESTED_ATTRIBUTE, True)
    return plain


def start(p: Any, host: Any, settings: MapSettings, options: Options, message: Callable[[str], None]) -> MapSession | None:
    """``process``: the maps' session of ``p`` (None: the option is off, or the model has no text encoder AlignIT knows)."""
    setattr(p, MAPS_ATTRIBUTE, None)
    if not settings.on:
        return None
    try:
        encoder = host.encoder()
    except Unsupported as error:
        message(f"{error}; no attention maps")
        return None
    concepts = tuple(
        Concept(c.trigger.strip(), " ".join(c.class_word.split()), c.source, c.strength)
        for c in options.concepts
        if c.trigger.strip()
    )
    nested = bool(getattr(p, NESTED_ATTRIBUTE, False))
    plain = _plain_copy(p) if settings.compare and not nested else None
    session = MapSession(host, encoder, settings, concepts, options, plain=plain, nested=nested)
    setattr(p, MAPS_ATTRIBUTE, session)
    return session


def _row_words(session: MapSession, text: str, count: int) -> list[int | None]:
    """The word of each conditioning row of a word-marked text, laid out as the WebUI lays out its plain text."""
    if text not in session.layouts:
        encoder = session.encoder
        chunks: list[Chunk] = layout_prompt(text, encoder, encoder.layout_options)
        encoder.check_layout(strip_markers(text), chunks)
        session.layouts[text] = row_words(chunks, count)
    return session.layouts[text]


def _item_plan(
    session: MapSession,
    schedules: Callable[[str, int | None], list[Schedule]],
    prompts: tuple[str, str],
    hires: tuple[str, str] | None,
    applied: tuple[frozenset[int], frozenset[int]],
    hires_steps: int | None,
) -> ItemPlan:
    """``prompts``: (as written, as the WebUI encodes it) for the first pass; ``hires`` the same for the hires pass."""
    concepts, settings = session.concepts, session.settings
    words = (
        parse_words(settings.words, concepts)
        if settings.words
        else default_words(prompts[0], concepts, session.options.placeholder)
    )
    plan = ItemPlan(words, applied[0])
    for attribute, pair, steps, used in (("first", prompts, None, applied[0]), ("hires", hires, hires_steps, applied[1])):
        if pair is None or not words:
            continue
        marked = mark_words(pair[0], concepts, words, used)
        if marked.plain != pair[1]:
            raise LayoutMismatch(f"the prompt '{pair[1][:60]}' is not the one AlignIT expected")
        parts = schedules(marked.marked, steps)
        for schedule in parts:
            for _, text in schedule:
                _row_words(session, text, len(words))
        setattr(plan, attribute, parts)
    return plan


def _applied(session: MapSession, original: str, planned: bool, concepts: Sequence[Concept]) -> frozenset[int]:
    """The concept rows (by index into ``session.concepts``) whose triggers AlignIT replaced in ``original``."""
    if not planned:
        return frozenset()
    found = rewrite_prompt(original, concepts).found
    triggers = {concept.trigger.strip().lower() for concept, count in zip(concepts, found) if count}
    return frozenset(i for i, concept in enumerate(session.concepts) if concept.trigger.lower() in triggers)


def plan_batch(
    p: Any,
    schedules: Callable[[str, int | None], list[Schedule]],
    originals: Sequence[str],
    hires_originals: Sequence[str] | None,
    planned: tuple[Sequence[bool], Sequence[bool]],
    aligned: Sequence[Concept],
    hires_steps: int | None,
    message: Callable[[str], None],
) -> None:
    """``process_batch``: plan the batch's maps. ``originals`` are the prompts before AlignIT, ``p.prompts`` after;
    ``planned`` says per image (first pass, hires) whether AlignIT rewrote it, with the concepts ``aligned``."""
    session: MapSession | None = getattr(p, MAPS_ATTRIBUTE, None)
    if session is None:
        return
    session.items = []
    hires = list(zip(hires_originals, p.hr_prompts)) if hires_originals is not None else None
    for i, (original, encoded) in enumerate(zip(originals, p.prompts)):
        applied = (
            _applied(session, original, planned[0][i], aligned),
            _applied(session, hires[i][0], planned[1][i], aligned) if hires else frozenset(),
        )
        try:
            plan = _item_plan(session, schedules, (original, encoded), hires[i] if hires else None, applied, hires_steps)
        except LayoutMismatch as error:
            message(f"{error}; no attention maps for this image")
            session.items.append(None)
            continue
        except Exception as error:  # a bug or a WebUI change must cost the maps, not the generation
            log.exception("AlignIT: planning attention maps")
            message(f"attention maps: {type(error).__name__}: {error}; no attention maps for this image")
            session.items.append(None)
            continue
        session.items.append(plan)
    session.recorder = MapRecorder([len(item.words) if item else 0 for item in session.items])


def _rows(cond: Any) -> torch.Tensor:
    return cond["crossattn"] if isinstance(cond, dict) else cond


def _entries(session: MapSession, c: Any, hires: bool, origins: Callable[[int, int, int], Any]) -> list[CondEntry]:
    """Every conditioning the pass may give an image's cond row, with its word columns. ``origins(item, part, entry)``:
    the splice's row origins of a schedule entry AlignIT spliced (None when it did not)."""
    entries = []
    plain_batch = getattr(c, "alignit_plain_batch", None) or c.batch
    for item, (parts, plain_parts, plan) in enumerate(zip(c.batch, plain_batch, session.items)):
        schedules = None if plan is None else (plan.hires if hires else plan.first)
        if plan is None or schedules is None or len(schedules) != len(parts):
            continue
        for part, (composable, plain, schedule) in enumerate(zip(parts, plain_parts, schedules)):
            plain_conds = [entry.cond for entry in plain.schedules]
            for scheduled in composable.schedules:
                index = next((i for i, (end, _) in enumerate(schedule) if end >= scheduled.end_at_step), len(schedule) - 1)
                words = _row_words(session, schedule[index][1], len(plan.words))
                if not any(scheduled.cond is cond for cond in plain_conds):
                    spliced = origins(item, part, index)
                    if spliced is not None:
                        words = spliced_row_words(words, spliced)
                rows = _rows(scheduled.cond)
                if len(words) == rows.shape[0]:
                    entries.append(CondEntry(item, rows, columns(words, len(plan.words))))
    return entries


def install(p: Any, c: Any, origins: Callable[[int, int, int], Any], message: Callable[[str], None]) -> None:
    """``process_before_every_sampling``: the host's hooks for the pass about to be sampled from ``c``."""
    session: MapSession | None = getattr(p, MAPS_ATTRIBUTE, None)
    if session is None or session.recorder is None or c is None:
        return
    remove(p, message)
    try:
        session.recorder.set_entries(_entries(session, c, bool(getattr(p, "is_hr_pass", False)), origins))
        cond_items = [item for item, parts in enumerate(c.batch) for _ in parts]
        session.mechanism = session.host.install_maps(p, session.recorder, cond_items)
    except Exception as error:  # a bug or a WebUI change must cost the maps, not the generation
        log.exception("AlignIT: installing the attention maps")
        message(f"attention maps: {type(error).__name__}: {error}; not recorded")


def remove(p: Any, message: Callable[[str], None]) -> None:
    """Take the pass's hooks off; say so if they failed."""
    session: MapSession | None = getattr(p, MAPS_ATTRIBUTE, None)
    if session is None or session.mechanism is None:
        return
    mechanism, session.mechanism = session.mechanism, None
    mechanism.remove()
    if mechanism.error:
        message(f"the attention maps stopped: {mechanism.error}")


def collect(p: Any, images: torch.Tensor | None, message: Callable[[str], None]) -> None:
    """``postprocess_batch``: the batch's maps, with its images ((B, 3, H, W) in [0, 1]) when given."""
    session: MapSession | None = getattr(p, MAPS_ATTRIBUTE, None)
    if session is None or session.recorder is None:
        return
    remove(p, message)
    recorder, session.recorder = session.recorder, None
    if not any(plan and plan.words for plan in session.items):
        return
    maps = recorder.maps()
    if not any(item.numel() for item in maps):
        message("no cross-attention layer reported to AlignIT: no attention maps")
        return
    for index, (plan, item_maps) in enumerate(zip(session.items, maps)):
        if plan is None or not plan.words:
            continue
        image = map_pictures.image_from_tensor(images[index]) if images is not None and index < len(images) else None
        session.results.append(ImageMaps(plan.words, plan.captions(session.concepts), item_maps, image))


def _plain_arguments(session: MapSession) -> dict[str, Any]:
    options = session.options
    return {
        "enabled": False,
        "step_start": options.step_start,
        "step_end": options.step_end,
        "placeholder": options.placeholder,
        "lora_scope": options.lora_scope,
        "concepts": [[c.trigger, c.class_word, c.source, c.strength] for c in options.concepts],
        "maps": True,
        "maps_compare": False,
        "maps_words": session.settings.words,
    }


def run_plain(p: Any, session: MapSession, arguments: tuple[int, int]) -> tuple[Any, MapSession | None]:
    """Compare's plain run: ``p``'s copy with the same prompts, seeds and settings, AlignIT off (the triggers stay),
    the maps on; ``arguments`` is where AlignIT's arguments lie in ``p.script_args``."""
    plain = session.plain
    plain.prompt, plain.negative_prompt = list(p.all_prompts), list(p.all_negative_prompts)
    plain.seed, plain.subseed = list(p.all_seeds), list(p.all_subseeds)
    if getattr(p, "enable_hr", False) and getattr(p, "all_hr_prompts", None):
        plain.hr_prompt, plain.hr_negative_prompt = list(p.all_hr_prompts), list(p.all_hr_negative_prompts)
    plain.styles = []  # already applied to the prompts
    plain.do_not_save_samples = plain.do_not_save_grid = True
    first, last = arguments
    script_args = list(p.script_args)
    script_args[first:last] = [_plain_arguments(session), *[None] * (last - first - 1)]
    plain.script_args = script_args
    if getattr(shared.state, "job_count", 0) > 0:  # the progress bar counts the plain run's batches too
        shared.state.job_count += plain.n_iter
    processed = processing.process_images(plain)
    return processed, getattr(plain, MAPS_ATTRIBUTE, None)


def _font(size: int) -> Any:
    return webui_images.get_font(size)


def show(p: Any, processed: Any, arguments: tuple[int, int], message: Callable[[str], None]) -> None:
    """``postprocess``: the maps' pictures after the images (with "compare", after the plain run's image)."""
    session: MapSession | None = getattr(p, MAPS_ATTRIBUTE, None)
    if session is None or session.nested or not session.results:
        return
    infotexts = list(getattr(processed, "infotexts", []) or [])
    first = getattr(processed, "index_of_first_image", 0)
    pictures: list[tuple[Any, str]] = []
    if session.plain is None:
        for index, result in enumerate(session.results):
            if result.image is None:
                continue
            info = infotexts[first + index] if first + index < len(infotexts) else ""
            shown = normalised(result.maps)
            pictures += [(picture, info) for picture in map_pictures.word_pictures(result.image, shown, result.captions, _font)]
    else:
        plain_processed, plain = run_plain(p, session, arguments)
        if plain is None or len(plain.results) < len(session.results):
            message("the plain run of 'compare' gave no maps for every image")
        for index, (result, other) in enumerate(zip(session.results, plain.results if plain else [])):
            info = infotexts[first + index] if first + index < len(infotexts) else ""
            plain_first = getattr(plain_processed, "index_of_first_image", 0)
            plain_images = list(getattr(plain_processed, "images", []) or [])
            plain_infos = list(getattr(plain_processed, "infotexts", []) or [])
            if plain_first + index < len(plain_images):
                plain_info = plain_infos[plain_first + index] if plain_first + index < len(plain_infos) else info
                pictures.append((plain_images[plain_first + index], plain_info))
            if result.image is None or other.image is None or result.words != other.words:
                continue
            both = torch.stack([result.maps, other.maps])
            low, high = both.amin(dim=(0, -2, -1)), both.amax(dim=(0, -2, -1))  # one scale per word, for both runs
            aligned = map_pictures.word_pictures(result.image, normalised(result.maps, low, high), result.captions, _font)
            without = map_pictures.word_pictures(other.image, normalised(other.maps, low, high), other.captions, _font)
            pictures.append((map_pictures.grid(list(zip(aligned, without)), COLUMNS, _font), info))
    processed.images.extend(picture for picture, _ in pictures)
    if isinstance(getattr(processed, "infotexts", None), list):
        processed.infotexts.extend(info for _, info in pictures)
