"""AlignIT's ComfyUI nodes, in ``conditioning/alignit``: **AlignIT Concept** (one concept; chain them into a list) and
**AlignIT Text Encode** (in place of CLIP Text Encode: CONDITIONING with the concepts' rows, and the MODEL for them).
ComfyUI reads the V1 node API: ``INPUT_TYPES``, ``RETURN_TYPES``, ``FUNCTION`` (comfy/comfy_types/node_typing.py)."""

from __future__ import annotations

from typing import Any

from ...concepts import LORA_SCOPES
from . import flow, sources

CATEGORY = "conditioning/alignit"
CONCEPTS = "ALIGNIT_CONCEPTS"


def _input(kind: Any, tooltip: str, **options: Any) -> tuple:
    """An input declaration with its tooltip (node_typing.py 119)."""
    return (kind, {**options, "tooltip": tooltip})


class AlignITConcept:
    DESCRIPTION = (
        "One customized concept for AlignIT Text Encode: where its trigger stands in the text, the base model reads the "
        "class word, and only the class word's rows (and keys and values) come from the concept."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (CONCEPTS,)
    RETURN_NAMES = ("concepts",)
    OUTPUT_TOOLTIPS = ("The concepts of the input, then this one: connect to AlignIT Text Encode or to another AlignIT Concept.",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "trigger": _input(
                    "STRING", "The word in your text that stands for the concept (whole words, any case).", default="<sks>"
                ),
                "class_word": _input(
                    "STRING",
                    "What the concept is, in plain words: the base model reads it in place of the trigger.",
                    default="cat",
                ),
                "source": _input(
                    sources.source_choices(),
                    "The concept's file: a textual-inversion embedding (embeddings), a LoRA (loras) or a Custom Diffusion "
                    "delta (models/custom_diffusion).",
                ),
                "strength": _input(
                    "FLOAT",
                    "1: the concept's rows as they are; 0: the class word's; in between a blend.",
                    default=1.0,
                    min=0.0,
                    max=2.0,
                    step=0.05,
                ),
            },
            "optional": {
                "concepts": _input(CONCEPTS, "Concepts from another AlignIT Concept node; this one is added to them."),
                "lora_weight": _input(
                    "FLOAT",
                    "A LoRA's strength, as in Load LoRA (other sources ignore it).",
                    default=1.0,
                    min=-10.0,
                    max=10.0,
                    step=0.01,
                ),
                "lora_scope": _input(
                    list(LORA_SCOPES),
                    "kv: the LoRA acts only through the concept's keys and values, its text part only on the concept's dummy "
                    "prompt; full: its UNet part also acts on the whole image (style) while every other word keeps the base "
                    "keys and values.",
                    default="kv",
                ),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, source: str) -> bool:
        """Any source passes: a file missing at run time is reported by AlignIT Text Encode, which leaves the concept out."""
        return True

    def add(
        self,
        trigger: str,
        class_word: str,
        source: str,
        strength: float,
        concepts: tuple[flow.ConceptInput, ...] | None = None,
        lora_weight: float = 1.0,
        lora_scope: str = "kv",
    ) -> tuple[tuple[flow.ConceptInput, ...]]:
        return ((*(concepts or ()), flow.ConceptInput(trigger, class_word, source, strength, lora_weight, lora_scope)),)


class AlignITTextEncode:
    DESCRIPTION = (
        "CLIP Text Encode with AlignIT (arXiv 2406.18893): the text is encoded with each trigger replaced by its class "
        "word, and only the class word's rows come from the concept, so the rest of the prompt keeps the base model's "
        "meaning. Use its MODEL output for sampling: LoRA and Custom Diffusion concepts act through it."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "MODEL")
    OUTPUT_TOOLTIPS = (
        "The text's conditioning with the concepts spliced in (CLIP Text Encode's when AlignIT cannot apply).",
        "The model for LoRA and Custom Diffusion concepts: a patched clone (the input model when no concept needs one).",
    )
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "clip": _input("CLIP", "The CLIP model used for encoding the text (SD1.x, SD2.x or SDXL)."),
                "model": _input(
                    "MODEL", "The diffusion model; AlignIT's clone of it comes out of the MODEL output, this one stays as it is."
                ),
                "text": _input(
                    "STRING", "The text to be encoded, with the concepts' triggers.", multiline=True, dynamicPrompts=True
                ),
                "concepts": _input(CONCEPTS, "The concepts, from AlignIT Concept nodes."),
                "start": _input(
                    "FLOAT",
                    "Where in the sampling schedule the concepts start (as in ConditioningSetTimestepRange).",
                    default=0.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                ),
                "end": _input(
                    "FLOAT",
                    "Where they end; outside the range the class word is used.",
                    default=1.0,
                    min=0.0,
                    max=1.0,
                    step=0.001,
                ),
            },
            "optional": {
                "placeholder": _input(
                    "STRING", "The neutral word (one token) for every other word of a concept's dummy prompt.", default="*"
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def encode(
        self,
        clip: Any,
        model: Any,
        text: str,
        concepts: tuple[flow.ConceptInput, ...],
        start: float = 0.0,
        end: float = 1.0,
        placeholder: str = "*",
        unique_id: str | None = None,
    ) -> dict:
        if clip is None:  # as CLIP Text Encode says it (nodes.py 73-75)
            raise RuntimeError(
                "ERROR: clip input is invalid: None\n\nIf the clip is from a checkpoint loader node your checkpoint does not "
                "contain a valid clip or text encoder model."
            )
        result = flow.align(clip, model, text, concepts, start, end, placeholder)
        out: dict = {"result": (result.conditioning, result.model)}
        if result.messages:
            _show(unique_id, result.messages)
            out["ui"] = {"text": ["AlignIT: " + message for message in result.messages]}
        return out


def _show(node: str | None, messages: list[str]) -> None:
    """The messages on the node in ComfyUI's frontend (server.py 1214, ``send_progress_text``)."""
    try:
        from server import PromptServer

        if node is not None:
            PromptServer.instance.send_progress_text("\n".join("AlignIT: " + message for message in messages), node)
    except (ImportError, AttributeError):  # no server (a script using the nodes): the console has the messages
        pass


sources.register_custom_diffusion_folder()

NODE_CLASS_MAPPINGS = {"AlignITConcept": AlignITConcept, "AlignITTextEncode": AlignITTextEncode}
NODE_DISPLAY_NAME_MAPPINGS = {"AlignITConcept": "AlignIT Concept", "AlignITTextEncode": "AlignIT Text Encode"}
