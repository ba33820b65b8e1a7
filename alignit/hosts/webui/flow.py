"""One generation in a WebUI (A1111 v1.10 or Forge), seen from the script's hooks; what differs lives in a ``Host``.

- ``process``: resolve the concepts against the loaded model; give ``p`` its own cond caches so no spliced
  conditioning reaches the WebUI's shared cache (``StableDiffusionProcessing.cached_c``).
- ``before_process_batch`` (before extra networks are parsed): a concept's LoRA is kept off the UNet ("kv" scope) or
  applied to the UNet only ("full" scope: ``<lora:NAME:0:WEIGHT>``), whatever tags the prompt has.
- ``process_batch`` (after extra networks are parsed, before ``setup_conds``): rewrite ``p.prompts`` and
  ``p.hr_prompts`` to class words, and do all per-prompt work (layout, check, encoding of p'). A prompt that fails
  keeps its original text, so the WebUI renders it as it would without AlignIT.
- ``process_before_every_sampling``: splice the prepared rows into the conditioning the sampler is about to use
  (first pass and hires pass). Text-side concepts need nothing per step; weight-side concepts (LoRA, Custom
  Diffusion) get their keys/values from the host's K/V mechanism for the pass.
- ``postprocess_batch``: the K/V mechanism comes off.

The attention maps (``maps``) ride on the same hooks, AlignIT on or off, and add ``postprocess``.

Both WebUIs keep A1111's ``prompt_parser`` (AND, prompt editing, ``MulticondLearnedConditioning``) and hook order.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from modules import extra_networks, prompt_parser, sd_samplers, shared

from ...attention_maps import MapRecorder
from ...concepts import Concept, Options, SourceKind, parse_source
from ...engine import ConceptSource, Splicer, TextEncoder
from ...errors import ConceptError, LayoutMismatch, NotLoaded, Unsupported
from ...infotext import to_infotext
from ...kv import Key
from ...prompt import rewrite_prompt, set_lora_tag
from ...schedule import active_steps
from . import args as alignit_args
from . import maps

log = logging.getLogger("alignit")

STATE_ATTRIBUTE = "alignit_state"
REFINER_NOTE = (
    "the refiner's steps condition on the prompt with the class words, without the concepts: AlignIT does not reach "
    "the refiner (after the switch the WebUI encodes the prompt anew with the refiner's own text encoder)"
)
WARNING_KEY = "AlignIT warning"
OVERRIDES_ATTRIBUTE = "alignit_overrides"


class KVMechanism(Protocol):
    """What gives weight-side concepts their keys/values during one sampling pass."""

    error: str | None  # why it stopped partway, if it did

    def unmatched_layers(self) -> list[Key]: ...

    def remove(self) -> None: ...


class Host(Protocol):
    """What differs between WebUIs: the text encoder, where sources come from, how keys/values are reached."""

    def begin(self) -> None:
        """Start of a generation: undo anything an earlier, failed generation may have left."""
        ...

    def encoder(self) -> TextEncoder:
        """The loaded model's text encoder(s); Unsupported when AlignIT cannot work with this model."""
        ...

    def resolve(self, concept: Concept, encoder: TextEncoder, lora_scope: str, warn: Callable[[str], None]) -> ConceptSource:
        """The concept's source, checked against the loaded model (ConceptError / Unsupported)."""
        ...

    def install_kv(self, p: Any, splicer: Splicer) -> KVMechanism | None:
        """Give the spliced weight-side concept rows their keys/values for the pass about to be sampled."""
        ...

    def install_maps(self, p: Any, recorder: MapRecorder, cond_items: Sequence[int]) -> maps.MapsMechanism:
        """Feed ``recorder`` with the attention of the pass about to be sampled (``cond_items[r]``: the image of cond
        row r, in the WebUI's order of cond rows)."""
        ...

    def source_choices(self) -> list[str]:
        """Every source a concept row can name (for the UI's dropdowns)."""
        ...

    def load_model(self) -> None:
        """Load the checkpoint the WebUI has selected when none is loaded yet, as a generation would."""
        ...

    def cross_attention(self) -> dict[Key, torch.nn.Module]:
        """The loaded UNet's cross-attention ``to_k``/``to_v`` projections."""
        ...

    def grad_mode(self) -> contextlib.AbstractContextManager:
        """The autograd mode the WebUI's own generation runs its models in, for work outside a generation."""
        ...


def model_problem(host: Host) -> str | None:
    """Why AlignIT cannot work with the loaded model, or None when it can (or no model is loaded yet)."""
    try:
        host.encoder()
    except NotLoaded:
        return None
    except Unsupported as error:
        return str(error)
    return None


def _total_steps(sampler_name: str | None, steps: int) -> int:
    config = sd_samplers.find_sampler_config(sampler_name)
    return config.total_steps(steps) if config else steps


def marked_schedules(marked_prompt: str, steps: int, hires_steps: int | None) -> list[list[tuple[int, str]]]:
    """Per AND part, the schedule ``[(end_at_step, marked text)]`` the WebUI computes for the prompt's plain text."""
    indexes, flat, _ = prompt_parser.get_multicond_prompt_list([marked_prompt])
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps, hires_steps, shared.opts.use_old_scheduling)
    return [[(end, text) for end, text in schedules[index]] for index, _ in indexes[0]]


@dataclass
class PassPlan:
    """What AlignIT will splice into one sampling pass: per batch item, per AND part, the marked schedule; whether the
    step range covers any of the pass's steps."""

    items: list[list[list[tuple[int, str]]] | None] = field(default_factory=list)
    in_range: bool = True


@dataclass
class Generation:
    """AlignIT's state for one ``p``: the host, the splicer and the plans of the current batch."""

    host: Host
    splicer: Splicer
    first: PassPlan | None = None
    hires: PassPlan | None = None
    kv: KVMechanism | None = None
    applied: set[int] = field(default_factory=set)  # concepts found in a prompt that AlignIT prepared
    kv_expects_rows: bool = True  # whether the pass's schedule puts the concept rows in front of the UNet at all

    @property
    def options(self) -> Options:
        return self.splicer.options

    def lora_tags(self) -> dict[str, str | None]:
        """LoRA name → the tag the prompt must carry for it (None: no tag), for every concept bound to a LoRA."""
        tags: dict[str, str | None] = {}
        for concept in self.options.concepts:
            spec = parse_source(concept)
            if spec.kind is SourceKind.LORA:
                tags[spec.name] = f"<lora:{spec.name}:0:{spec.weight:g}>" if self.options.lora_scope == "full" else None
        return tags


def _message(p: Any, text: str) -> None:
    """Tell the user, in one line: the log, the UI (``p.comment``) and the infotext, which API responses carry."""
    text = " ".join(str(text).split())
    log.warning("AlignIT: %s", text)
    p.comment(f"AlignIT: {text}")
    earlier = p.extra_generation_params.get(WARNING_KEY)
    if earlier is None or text not in earlier:
        p.extra_generation_params[WARNING_KEY] = text if earlier is None else f"{earlier}; {text}"


def _own_cache(cache: list) -> list:
    return [None] * len(cache)


def start(p: Any, host: Host, enabled: bool, options: Options) -> Generation | None:
    """Validate, resolve the concepts, isolate ``p``'s cond caches. None: AlignIT stays off."""
    setattr(p, STATE_ATTRIBUTE, None)
    if not enabled:
        return None
    try:
        options = options.validated()
        encoder = host.encoder()
    except (ConceptError, Unsupported) as error:
        _message(p, f"{error}; generating without AlignIT")
        return None
    sources: list[ConceptSource] = []
    concepts: list[Concept] = []
    for concept in options.concepts:
        try:
            concept = concept.validated()
            sources.append(host.resolve(concept, encoder, options.lora_scope, lambda text: _message(p, text)))
            concepts.append(concept)
        except (ConceptError, Unsupported) as error:
            _message(p, f"{error}; this concept is left to the WebUI")
        except Exception as error:  # a bug or a WebUI change must cost the concept, not the generation
            log.exception("AlignIT: resolving concept %r", concept.trigger)
            _message(p, f"concept '{concept.trigger}': {type(error).__name__}: {error}; this concept is left to the WebUI")
    if not concepts:
        if options.concepts:
            _message(p, "no usable concept; generating without AlignIT")
        return None
    options = replace(options, concepts=tuple(concepts))
    splicer = Splicer(encoder, sources, options)
    try:
        _ = splicer.placeholder_id
    except ConceptError as error:
        _message(p, f"{error}; generating without AlignIT")
        return None
    if getattr(p, "refiner_checkpoint_info", None) is not None:
        _message(p, REFINER_NOTE)
    p.cached_c = _own_cache(p.cached_c)
    if hasattr(p, "cached_hr_c"):
        p.cached_hr_c = _own_cache(p.cached_hr_c)
    generation = Generation(host, splicer)
    setattr(p, STATE_ATTRIBUTE, generation)
    return generation


def process(p: Any, host: Host, script_args: Sequence[Any]) -> Generation | None:
    """``process`` hook: read the script's arguments and X/Y/Z overrides, start AlignIT, write its infotext."""
    host.begin()
    setattr(p, STATE_ATTRIBUTE, None)
    setattr(p, maps.MAPS_ATTRIBUTE, None)
    try:
        enabled, options = alignit_args.parse_args(script_args)
        enabled, options = alignit_args.with_overrides(enabled, options, getattr(p, OVERRIDES_ATTRIBUTE, None) or {})
        settings = alignit_args.parse_maps(script_args)
    except (ConceptError, ValueError) as error:
        _message(p, f"{error}; generating without AlignIT")
        return None
    if maps.start(p, host, settings, options, lambda text: _message(p, text)) is not None:
        p.extra_generation_params.update(alignit_args.maps_infotext(settings))
    if enabled and not options.concepts:
        _message(p, "AlignIT is enabled but no concept row is filled in; generating without it")
        return None
    return start(p, host, enabled, options)


def _plan_prompts(
    p: Any, generation: Generation, prompts: list[str], steps: int, hires_steps: int | None, named: set[int]
) -> tuple[list[str], PassPlan]:
    """The pass's prompts rewritten to class words and their plan; ``named`` gathers the concepts the prompts name."""
    first, last = active_steps(hires_steps or steps, generation.options.step_start, generation.options.step_end)
    plan = PassPlan(in_range=first < (hires_steps or steps) and (last is None or last >= first))
    out = []
    concepts = generation.options.concepts
    for prompt in prompts:
        rewrite = rewrite_prompt(prompt, concepts)
        named.update(i for i, count in enumerate(rewrite.found) if count)
        if not rewrite.has_concepts:
            out.append(prompt)
            plan.items.append(None)
            continue
        try:
            schedules = marked_schedules(rewrite.marked, steps, hires_steps)
            for schedule in schedules:
                for _, text in schedule:
                    generation.splicer.prepare(text)
        except Exception as error:  # ConceptError, LayoutMismatch, or a bug: the prompt goes to the WebUI as it is
            if not isinstance(error, (ConceptError, LayoutMismatch)):
                log.exception("AlignIT: preparing %r", prompt)
            _message(p, f"{error}; this prompt is generated without AlignIT")
            out.append(prompt)
            plan.items.append(None)
            continue
        out.append(rewrite.plain)
        plan.items.append(schedules)
        generation.applied.update(i for i, count in enumerate(rewrite.found) if count)
    return out, plan


def set_lora_tags(p: Any) -> None:
    """``before_process_batch`` hook: the concepts' LoRA tags as their scope wants them, in the batch's prompts."""
    generation: Generation | None = getattr(p, STATE_ATTRIBUTE, None)
    if generation is None:
        return
    for name, tag in generation.lora_tags().items():
        p.prompts = [set_lora_tag(prompt, name, tag) for prompt in p.prompts]


def _set_hires_lora_tags(p: Any, generation: Generation) -> None:
    """The hires prompts' extra networks are parsed with the first pass's: edit their parsed form."""
    data = getattr(p, "hr_extra_network_data", None)
    tags = generation.lora_tags()
    if data is None or not tags:
        return
    kept = [params for params in data.get("lora", []) if not params.items or params.items[0] not in tags]
    for tag in filter(None, tags.values()):
        kept.append(extra_networks.ExtraNetworkParams(items=tag[len("<lora:") : -1].split(":")))
    data["lora"] = kept


def prepare_batch(p: Any) -> None:
    """``process_batch`` hook: rewrite the batch's prompts to class words and prepare every p'; plan the maps."""
    generation: Generation | None = getattr(p, STATE_ATTRIBUTE, None)
    hires = bool(getattr(p, "enable_hr", False) and getattr(p, "hr_prompts", None))
    steps = _total_steps(p.sampler_name, p.steps)
    hires_steps = _total_steps(p.hr_sampler_name or p.sampler_name, p.hr_second_pass_steps or p.steps) if hires else None
    originals, hires_originals = list(p.prompts), list(p.hr_prompts) if hires else None
    if generation is not None:
        _set_hires_lora_tags(p, generation)
        named: set[int] = set()
        with torch.no_grad():
            p.prompts, generation.first = _plan_prompts(p, generation, list(p.prompts), steps, None, named)
            generation.hires = None
            if hires:
                p.hr_prompts, generation.hires = _plan_prompts(p, generation, list(p.hr_prompts), steps, hires_steps, named)
        while generation.splicer.warnings:
            _message(p, generation.splicer.warnings.pop(0))
        _report_concepts(p, generation, named)
    first, second = (
        [item is not None for item in plan.items] if plan else [False] * len(originals) for plan in _plans(generation)
    )
    maps.plan_batch(
        p,
        lambda text, hires_steps: marked_schedules(text, steps, hires_steps),
        originals,
        hires_originals,
        (first, second),
        generation.options.concepts if generation else (),
        hires_steps,
        lambda text: _message(p, text),
    )


def _plans(generation: Generation | None) -> tuple[PassPlan | None, PassPlan | None]:
    return (generation.first, generation.hires) if generation else (None, None)


def _report_concepts(p: Any, generation: Generation, named: set[int]) -> None:
    """Say which concepts the batch's prompts never name; the infotext records the concepts applied so far."""
    concepts = generation.options.concepts
    for i, concept in enumerate(concepts):
        if i not in named:
            _message(p, f"concept '{concept.trigger}': its trigger is not in the prompt")
    for key in [key for key in p.extra_generation_params if key.startswith("AlignIT ") and key[8:].isdigit()]:
        del p.extra_generation_params[key]
    applied = [concept for i, concept in enumerate(concepts) if i in generation.applied]
    p.extra_generation_params.update(to_infotext(generation.options, applied) if applied else {})


def splice_conditioning(c: Any, plan: PassPlan, splicer: Splicer) -> None:
    """Point ``c`` (a MulticondLearnedConditioning, from ``p``'s own cache) at AlignIT's schedules.

    The plain schedules stay on ``c`` so that a second call (a later batch hitting ``p``'s cache) starts from them.
    """
    plain = getattr(c, "alignit_plain_batch", None) or c.batch
    c.alignit_plain_batch = plain
    batch = []
    for parts, planned in zip(plain, plan.items):
        if planned is None:
            batch.append(parts)
            continue
        if len(parts) != len(planned):
            raise LayoutMismatch("the prompt's AND parts differ from the ones AlignIT planned")
        batch.append(
            [
                prompt_parser.ComposableScheduledPromptConditioning(
                    [
                        prompt_parser.ScheduledPromptConditioning(end, cond)
                        for end, cond in splicer.align_schedule([(s.end_at_step, s.cond) for s in part.schedules], marked)
                    ],
                    part.weight,
                )
                for part, marked in zip(parts, planned)
            ]
        )
    c.batch = batch


def before_sampling(p: Any, c: Any) -> None:
    """``process_before_every_sampling`` hook: splice into the first-pass or hires-pass conditioning, install the maps'
    hooks, then give weight-side concepts their keys/values (on Forge these patches wrap the maps')."""
    generation: Generation | None = getattr(p, STATE_ATTRIBUTE, None)
    plan = _plans(generation)[1 if getattr(p, "is_hr_pass", False) else 0]
    spliced = generation is not None and _splice(p, generation, plan, c)

    def origins(item: int, part: int, index: int) -> Any:
        schedules = plan.items[item] if plan and spliced else None
        return generation.splicer.row_origins(schedules[part][index][1]) if generation and schedules else None

    maps.install(p, c, origins, lambda text: _message(p, text))
    if generation is not None and plan is not None and spliced:
        _install_kv(p, generation, plan)


def _splice(p: Any, generation: Generation, plan: PassPlan | None, c: Any) -> bool:
    """Splice the pass's conditioning; False when there is nothing to splice or it failed."""
    if plan is None or c is None or not any(plan.items):
        return False
    if not plan.in_range:
        span = f"{generation.options.step_start:g}-{generation.options.step_end:g}"
        _message(p, f"the step range {span} covers no sampling step of this pass: the class word is used throughout")
    try:
        with torch.no_grad():
            splice_conditioning(c, plan, generation.splicer)
    except Exception as error:
        if not isinstance(error, LayoutMismatch):
            log.exception("AlignIT: splicing")
        _message(p, f"{error}; the class word is used without the concept")
        return False
    return True


def _install_kv(p: Any, generation: Generation, plan: PassPlan) -> None:
    _remove_kv(p, generation)
    generation.kv_expects_rows = plan.in_range  # a full-scope LoRA still comes off every row outside the range
    try:
        generation.kv = generation.host.install_kv(p, generation.splicer)
    except Exception as error:  # the text-side splice stands; the pass runs without the concept's own K/V weights
        log.exception("AlignIT: installing the key/value patch")
        _message(p, f"{type(error).__name__}: {error}; the concept's own key/value weights are not applied")


def _remove_kv(p: Any, generation: Generation) -> None:
    """Take the pass's K/V mechanism off; say so if it failed or never found a concept row."""
    kv, generation.kv = generation.kv, None
    if kv is None:
        return
    kv.remove()
    if kv.error:
        _message(p, f"{kv.error}; the concept's own key/value weights were not applied from then on")
        return
    unmatched = kv.unmatched_layers() if generation.kv_expects_rows else []
    if unmatched:
        _message(p, f"the concept rows never reached {unmatched[0][0]}: something between the prompt and the UNet changed them")


def finish_batch(p: Any, images: Any = None) -> None:
    """``postprocess_batch`` hook: take the K/V mechanism off; collect the batch's maps with its ``images``."""
    generation: Generation | None = getattr(p, STATE_ATTRIBUTE, None)
    if generation is not None:
        _remove_kv(p, generation)
    maps.collect(p, images, lambda text: _message(p, text))


def finish(p: Any, processed: Any, arguments: tuple[int, int]) -> None:
    """``postprocess`` hook: the maps' pictures go to the gallery (``arguments``: AlignIT's in ``p.script_args``)."""
    try:
        maps.show(p, processed, arguments, lambda text: _message(p, text))
    except Exception as error:  # a bug or a WebUI change must cost the maps, not the images
        log.exception("AlignIT: showing the attention maps")
        _message(p, f"attention maps: {type(error).__name__}: {error}")
