"""AlignIT on a diffusers Stable Diffusion pipeline (SD 1.x/2.x, SDXL; txt2img and img2img).

One call:

1. each prompt's triggers become class words (p); its layout is checked against the pipeline's tokenizer(s);
2. p is encoded by the pipeline's own ``encode_prompt``, so every row but the concept's is exactly the pipeline's;
   SDXL's pooled embedding stays the one of p;
3. each concept's p' is encoded by the pipeline's text encoder(s) with the concept (embedding vectors, a LoRA's text
   part) and its rows are spliced in (``Splicer``);
4. weight-side concepts (LoRA, Custom Diffusion) get forward hooks on the ``to_k``/``to_v`` of the cross-attention
   layers they touch, which rewrite the concept rows of k and v (``KVRewriter``) inside whatever attention processor
   the layer has; no weight and no processor changes;
5. the pipeline runs with ``prompt_embeds`` (the negative prompt is the pipeline's, untouched); a step range swaps
   the cond rows in ``callback_on_step_end``. The hooks come off in ``finally``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

from ...concepts import Concept, Options
from ...engine import ConceptSource, Splicer, resolve_source
from ...errors import ConceptError, Unsupported
from ...kv_hooks import KVInjector
from ...layout import CHUNK_ROWS
from ...prompt import Rewrite, rewrite_prompt
from ...schedule import active_steps
from ...sources.names import attn2_projection
from .customized import customized
from .encoder import DiffusersEncoder
from .sources import DiffusersSources, SourceFiles

log = logging.getLogger("alignit")

PIPELINES = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)


def check_pipeline(pipe: Any) -> None:
    """Unsupported unless ``pipe`` is one of the pipelines AlignIT runs on."""
    if not isinstance(pipe, PIPELINES):
        names = ", ".join(cls.__name__ for cls in PIPELINES)
        raise Unsupported(f"AlignIT runs on {names}; this is a {type(pipe).__name__}")


class AlignIT:
    """AlignIT for fixed concepts on one pipeline: the sources are read and checked once, each call generates.

    ``aligned(prompt, **kwargs)`` takes the pipeline's own arguments (``negative_prompt``, ``generator``,
    ``num_inference_steps``, ``image`` for img2img…) and returns its output. ``messages`` collects what the user
    should know (also logged to the ``alignit`` logger). Bad concepts raise ConceptError, an unsupported pipeline
    or setting Unsupported, each with a one-line message.
    """

    def __init__(self, pipe: Any, concepts: Sequence[Concept], options: Options | None = None):
        check_pipeline(pipe)
        if not concepts:
            raise ConceptError("no concept given")
        options = replace(options or Options(), concepts=tuple(concept.validated() for concept in concepts)).validated()
        if options.lora_scope != "kv":
            raise Unsupported("the diffusers host applies LoRAs in the 'kv' scope only")
        self.pipe = pipe
        self.options = options
        self.resolver = DiffusersSources(pipe, DiffusersEncoder(pipe))
        self.sources: list[ConceptSource] = [resolve_source(concept, self.resolver) for concept in options.concepts]
        self.messages: list[str] = []

    @property
    def concepts(self) -> tuple[Concept, ...]:
        return self.options.concepts

    def files(self, concept: Concept) -> SourceFiles:
        """What the concept's source holds (for the plain customized pipeline)."""
        return self.resolver.files[concept]

    def say(self, text: str) -> None:
        log.warning("AlignIT: %s", text)
        if text not in self.messages:
            self.messages.append(text)

    def rewrite(self, prompts: Sequence[str]) -> list[Rewrite]:
        """The prompts with their triggers replaced; ConceptError when a concept's trigger is in none of them."""
        rewrites = [rewrite_prompt(prompt, self.concepts) for prompt in prompts]
        for index, concept in enumerate(self.concepts):
            if not any(rewrite.found[index] for rewrite in rewrites):
                raise ConceptError(f"the trigger '{concept.trigger}' is not in the prompt '{prompts[0][:80]}'")
        return rewrites

    def _spliced(self, splicer: Splicer, rewrite: Rewrite, rows: torch.Tensor) -> torch.Tensor:
        """p's 77 rows with the concept rows spliced in; diffusers encodes only the first chunk of a longer prompt."""
        chunks = splicer.layout(rewrite.marked)
        if len(chunks) > 1:
            self.say(f"'{rewrite.original[:60]}…' is longer than 77 tokens: the pipeline truncates it, AlignIT too")
            kept = {span.concept for span in chunks[0].spans}
            cut = [concept.trigger for i, concept in enumerate(self.concepts) if rewrite.found[i] and i not in kept]
            if cut:
                raise ConceptError(f"the trigger '{cut[0]}' lies beyond the 77 tokens the pipeline encodes")
            rows = torch.cat([rows, rows[-1:].expand((len(chunks) - 1) * CHUNK_ROWS, -1)])
        return splicer.splice(rewrite.marked, rows)[:CHUNK_ROWS]

    def __call__(self, prompt: str | list[str], **kwargs: Any) -> Any:
        """Generate with AlignIT on: the pipeline's output (``.images``)."""
        for name in ("prompt_embeds", "pooled_prompt_embeds", "prompt_2"):
            if kwargs.get(name) is not None:
                raise Unsupported(f"AlignIT computes the prompt's embeddings itself: '{name}' cannot be given")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rewrites = self.rewrite(prompts)
        encoder = DiffusersEncoder(self.pipe, kwargs.get("clip_skip"))
        splicer = Splicer(encoder, self.sources, self.options)
        _ = splicer.placeholder_id
        plain, pooled = self._encode([rewrite.plain for rewrite in rewrites], kwargs)
        with torch.no_grad():
            aligned = torch.stack([self._spliced(splicer, rewrite, rows) for rewrite, rows in zip(rewrites, plain)])
        while splicer.warnings:
            self.say(splicer.warnings.pop(0))

        arguments = dict(kwargs)
        if isinstance(arguments.get("negative_prompt"), str) and len(prompts) > 1:
            arguments["negative_prompt"] = [arguments["negative_prompt"]] * len(prompts)
        if pooled is not None:
            arguments["pooled_prompt_embeds"] = pooled
        start, end = self.options.step_start, self.options.step_end
        if (start, end) != (0.0, 1.0):
            _switch_rows(arguments, plain, aligned, start, end)
        arguments["prompt_embeds"] = aligned if start == 0.0 else plain

        chunks = splicer.kv_chunks()
        injector = KVInjector(self.pipe.unet, chunks, splicer.kv_weights()) if chunks else None
        try:
            return self.pipe(**arguments)
        finally:
            if injector is not None:
                injector.remove()
                self._report(injector)

    def plain(self, prompt: str | list[str], **kwargs: Any) -> Any:
        """The plain customized generation: the pipeline customized the ecosystem's way (``customized``), the
        trigger kept in the prompt, AlignIT off."""
        with customized(self.pipe, [(concept, self.files(concept)) for concept in self.concepts]):
            return self.pipe(prompt=prompt, **kwargs)

    def _encode(self, prompts: list[str], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """p's rows (and SDXL's pooled embedding) from the pipeline's own ``encode_prompt``."""
        lora_scale = (kwargs.get("cross_attention_kwargs") or {}).get("scale")
        encoded = self.pipe.encode_prompt(
            prompt=prompts,
            device=self.pipe._execution_device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            lora_scale=lora_scale,
            clip_skip=kwargs.get("clip_skip"),
        )
        if isinstance(self.pipe, (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)):
            return encoded[0], encoded[2]
        return encoded[0], None

    def _report(self, injector: KVInjector) -> None:
        if injector.error:
            self.say(f"{injector.error}; the concept's own key/value weights were not applied from then on")
            return
        unreached = [key for key in injector.rewriter.layers if key not in injector.reached]
        if unreached:
            processor = _processor_of(self.pipe.unet, unreached[0][0])
            self.say(
                f"the attention processor of {unreached[0][0]} ({processor}) never called its to_k/to_v: the concept's "
                "own key/value weights were not applied there"
            )
        unmatched = injector.unmatched_layers()
        if unmatched:
            self.say(f"the concept rows never reached {unmatched[0][0]}: something between the prompt and the UNet changed them")


def _processor_of(unet: torch.nn.Module, layer: str) -> str:
    """The class name of the attention processor of an ldm-named cross-attention layer."""
    for name, module in unet.named_modules():
        projection = attn2_projection(f"{name}.to_k") if name.endswith("attn2") else None
        if projection is not None and projection[0] == layer:
            return type(getattr(module, "processor", None)).__name__
    return "unknown"


def _switch_rows(arguments: dict[str, Any], plain: torch.Tensor, aligned: torch.Tensor, start: float, end: float) -> None:
    """Make the pipeline use AlignIT's rows only in the step range: at the end of each step, the cond rows of its
    ``prompt_embeds`` (the last ``len(prompts) · num_images_per_prompt`` batch rows) become the next step's."""
    user = arguments.get("callback_on_step_end")
    inputs = list(arguments.get("callback_on_step_end_tensor_inputs") or ["latents"])
    if isinstance(user, (PipelineCallback, MultiPipelineCallbacks)):
        inputs = list(user.tensor_inputs)
    per_prompt = int(arguments.get("num_images_per_prompt") or 1)

    def on_step_end(pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        first, last = active_steps(pipe.num_timesteps, start, end)
        following = step + 1
        rows = aligned if first <= following and (last is None or following <= last) else plain
        embeds = tensors["prompt_embeds"]
        cond = rows.repeat_interleave(per_prompt, dim=0).to(embeds)
        tensors = {**tensors, "prompt_embeds": torch.cat([embeds[: len(embeds) - len(cond)], cond])}
        if user is not None:
            tensors = {**tensors, **user(pipe, step, timestep, tensors)}
        return tensors

    callback: Callable[..., dict[str, Any]] = on_step_end
    arguments["callback_on_step_end"] = callback
    arguments["callback_on_step_end_tensor_inputs"] = sorted(set(inputs) | {"prompt_embeds"})
