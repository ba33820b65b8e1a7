"""AlignIT's WebUI entry: the accordion, infotext, X/Y/Z axes. All the work is done in ``alignit``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.infotext_utils import PasteField

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignit.hosts.webui import args as alignit_args  # noqa: E402
from alignit.hosts.webui import flow as webui  # noqa: E402
from alignit.hosts.webui import suggest_route, suggestions  # noqa: E402
from alignit.hosts.webui.detect import current_host  # noqa: E402
from alignit.hosts.webui.sources import CD_DIR_OPTION  # noqa: E402

TITLE = "AlignIT"
HOST = current_host()
RANKING = "Ranking class words… (the first time after a model loads, every candidate is encoded once: slow on a CPU)"
MODELS = (
    "Works with SD1.x, SD2.x and SDXL checkpoints; not with Flux or SD3, which have no UNet cross-attention. "
    "With a refiner, the steps after the switch get the prompt with the class words, without the concepts: "
    "AlignIT does not reach the refiner."
)


GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4
ROW_MIN = 120  # px: a concept row's four fields and its Suggest button stay on one line in the accordion
# Gradio 4 (Forge's) shows a dropdown whose value is empty as holding its first choice (dropdown/shared/Dropdown.svelte
# 47-65), so there the list starts with the empty source, named; Gradio 3 (A1111's) shows the field empty.
TRIGGERS_OWN = ("(the embedding named like the trigger)", "")


def source_choices() -> list:
    """What a Source list offers: every embedding, LoRA and Custom Diffusion file (on Gradio 4, the empty source first)."""
    choices = HOST.source_choices()
    return [TRIGGERS_OWN, *choices] if GRADIO_4 else choices


def refreshed(value: str) -> dict:
    """A source list read again, keeping the field's value."""
    return gr.update(choices=source_choices(), value=value)


def model_note() -> str:
    """The accordion's note: which models AlignIT applies to, and whether the loaded one is among them."""
    problem = webui.model_problem(HOST)
    return MODELS if problem is None else f"{MODELS}\n\n**The loaded model:** {problem}; AlignIT stays off."


class AlignITScript(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return TITLE

    def show(self, is_img2img: bool) -> object:
        return scripts.AlwaysVisible

    def concept_row(self, tab: str, i: int) -> tuple[list, Callable]:
        """One concept row (trigger, class word with its Suggest button, source, strength) and the suggestions under
        it; returns the row's four inputs and what wires Suggest once the placeholder field exists."""
        with gr.Row(elem_classes=["alignit-concept"]):
            trigger = gr.Textbox(
                label="Trigger", placeholder="<sks>", max_lines=1, min_width=ROW_MIN, elem_id=f"alignit_{tab}_trigger_{i}"
            )
            class_word = gr.Textbox(
                label="Class word", placeholder="cat", max_lines=1, min_width=ROW_MIN, elem_id=f"alignit_{tab}_class_{i}"
            )
            suggest = gr.Button(
                "Suggest", size="sm", scale=0, min_width=0, elem_id=f"alignit_{tab}_suggest_{i}", elem_classes=["alignit-suggest"]
            )
            source = gr.Dropdown(
                label="Source",
                choices=source_choices(),
                value="",
                allow_custom_value=True,
                min_width=ROW_MIN,
                elem_id=f"alignit_{tab}_source_{i}",
            )
            strength = gr.Slider(
                0.0, 2.0, value=1.0, step=0.05, label="Strength", min_width=ROW_MIN, elem_id=f"alignit_{tab}_strength_{i}"
            )
        with gr.Row(visible=False, elem_id=f"alignit_{tab}_suggestions_{i}", elem_classes=["alignit-suggestions"]) as shown:
            message = gr.Markdown("", visible=False, elem_id=f"alignit_{tab}_suggestion_message_{i}")
            choices = [
                gr.Button("", size="sm", scale=0, min_width=0, elem_id=f"alignit_{tab}_suggestion_{i}_{n}")
                for n in range(suggestions.TOP)
            ]
        found = gr.State([])

        def show(*row) -> list:
            words, why = suggestions.for_row(HOST, *row)
            labels = suggestions.suggestion_labels(words)
            buttons = [
                gr.update(value=labels[n], visible=True) if n < len(labels) else gr.update(visible=False)
                for n in range(len(choices))
            ]
            return [gr.update(visible=True), gr.update(value=why, visible=bool(why)), *buttons, [item.word for item in words]]

        def wire(trigger_, class_word_, source_, strength_, placeholder) -> None:
            suggest.click(
                lambda: [gr.update(visible=True), gr.update(value=RANKING, visible=True)], outputs=[shown, message]
            ).then(
                show, inputs=[trigger_, class_word_, source_, strength_, placeholder], outputs=[shown, message, *choices, found]
            )
            for n, button in enumerate(choices):
                button.click(
                    lambda words, n=n: words[n] if n < len(words) else gr.update(), inputs=[found], outputs=[class_word_]
                )

        return [trigger, class_word, source, strength], wire

    def ui(self, is_img2img: bool) -> list:
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion(TITLE, open=False, elem_id=f"alignit_{tab}"):
            enabled = gr.Checkbox(False, label="Enable AlignIT", elem_id=f"alignit_{tab}_enabled")
            note = gr.Markdown(MODELS, elem_id=f"alignit_{tab}_note")
            rows = []
            suggesting = []
            for i in range(alignit_args.ROWS):
                inputs, suggest = self.concept_row(tab, i)
                rows += inputs
                suggesting.append(suggest)
            with gr.Row():
                step_start = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="From step", elem_id=f"alignit_{tab}_start")
                step_end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="To step", elem_id=f"alignit_{tab}_end")
                placeholder = gr.Textbox("*", label="Placeholder", max_lines=1, elem_id=f"alignit_{tab}_placeholder")
                lora_scope = gr.Radio(choices=["kv", "full"], value="kv", label="LoRA scope", elem_id=f"alignit_{tab}_lora_scope")
                refresh = gr.Button("Refresh sources", elem_id=f"alignit_{tab}_refresh")
            maps = self.maps_ui(tab)
        sources = rows[2 :: len(alignit_args.ROW_FIELDS)]
        refresh.click(lambda *values: [refreshed(value) for value in values], inputs=sources, outputs=sources)
        enabled.change(lambda _: gr.update(value=model_note()), inputs=[enabled], outputs=[note])
        # Embeddings load after the UI is built: the lists are read again when the accordion opens (alignit.js) and,
        # on Gradio 3, whenever a list opens (on Gradio 4 an update while it opens redraws the list under the pointer).
        for source in sources if not GRADIO_4 else []:
            source.focus(refreshed, inputs=[source], outputs=[source])
        width = len(alignit_args.ROW_FIELDS)
        for i, wire in enumerate(suggesting):
            wire(*rows[i * width : (i + 1) * width], placeholder)

        components = [enabled, step_start, step_end, placeholder, lora_scope, *rows, *maps]
        self.infotext_fields = [PasteField(component, alignit_args.PASTE_KEY.format(i)) for i, component in enumerate(components)]
        self.paste_field_names = []
        return components

    def maps_ui(self, tab: str) -> list:
        """The attention maps' group: on, compare with a plain run, the words."""
        with gr.Group(elem_id=f"alignit_{tab}_maps"):
            with gr.Row():
                maps = gr.Checkbox(False, label="Attention maps", elem_id=f"alignit_{tab}_maps_on")
                compare = gr.Checkbox(
                    False, label="Compare with plain (AlignIT off, same seed)", elem_id=f"alignit_{tab}_maps_compare"
                )
                words = gr.Textbox(
                    label="Map words (comma-separated; empty: the class word and the prompt's content words, at most 8)",
                    max_lines=1,
                    elem_id=f"alignit_{tab}_maps_words",
                )
        return [maps, compare, words]

    def process(self, p, *args) -> None:
        webui.process(p, HOST, args)

    def before_process_batch(self, p, *args, **kwargs) -> None:
        webui.set_lora_tags(p)

    def process_batch(self, p, *args, **kwargs) -> None:
        webui.prepare_batch(p)

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        webui.before_sampling(p, kwargs.get("c"))

    def postprocess_batch(self, p, *args, **kwargs) -> None:
        webui.finish_batch(p, kwargs.get("images"))

    def postprocess(self, p, processed, *args) -> None:
        webui.finish(p, processed, (self.args_from, self.args_to))


def on_ui_settings() -> None:
    section = ("alignit", "AlignIT")
    shared.opts.add_option(
        CD_DIR_OPTION,
        shared.OptionInfo("", "Custom Diffusion deltas folder (empty: models/CustomDiffusion)", section=section),
    )
    shared.opts.add_option(
        suggestions.WORDS_OPTION,
        shared.OptionInfo(
            "", "Class-word list for Suggest: a text file, one word per line (added to AlignIT's own list)", section=section
        ),
    )


def _override(key: str, kind: type):
    def apply(p, value, _values) -> None:
        overrides = dict(getattr(p, webui.OVERRIDES_ATTRIBUTE, None) or {})
        overrides[key] = kind(value)
        setattr(p, webui.OVERRIDES_ATTRIBUTE, overrides)

    return apply


def add_axis_options() -> bool:
    """Add AlignIT's X/Y/Z plot axes once; False while the X/Y/Z script is not loaded yet."""
    xyz = next((x.module for x in scripts.scripts_data if x.script_class.__module__ == "xyz_grid.py"), None)
    if xyz is None:
        return False
    if any(option.label.startswith("[AlignIT]") for option in xyz.axis_options):
        return True
    xyz.axis_options.extend(
        [
            xyz.AxisOption(
                "[AlignIT] Enabled",
                str,
                _override("enabled", lambda v: str(v).lower() == "true"),
                choices=xyz.boolean_choice(reverse=True),
            ),
            xyz.AxisOption("[AlignIT] Strength (all concepts)", float, _override("strength", float)),
            xyz.AxisOption("[AlignIT] Class word", str, _override("class_word", str)),
            xyz.AxisOption("[AlignIT] Step start", float, _override("step_start", float)),
            xyz.AxisOption("[AlignIT] Step end", float, _override("step_end", float)),
        ]
    )
    return True


# At import, so the axes also exist with --nowebui, where the API is built before on_before_ui callbacks run.
if not add_axis_options():
    script_callbacks.on_before_ui(add_axis_options)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_infotext_pasted(lambda infotext, params: alignit_args.paste(params))
script_callbacks.on_model_loaded(suggestions.forget_model)
script_callbacks.on_app_started(lambda demo, app: suggest_route.register(app, HOST))
