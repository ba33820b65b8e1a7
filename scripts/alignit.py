"""AlignIT's WebUI entry: the accordion, infotext, X/Y/Z axes. All the work is done in ``alignit``."""

from __future__ import annotations

import os
import sys

import gradio as gr
from modules import script_callbacks, scripts, shared
from modules.infotext_utils import PasteField

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alignit.hosts.webui import args as alignit_args  # noqa: E402
from alignit.hosts.webui import flow as webui  # noqa: E402
from alignit.hosts.webui.detect import current_host  # noqa: E402
from alignit.hosts.webui.sources import CD_DIR_OPTION  # noqa: E402

TITLE = "AlignIT"
HOST = current_host()
MODELS = (
    "Works with SD1.x, SD2.x and SDXL checkpoints; not with Flux or SD3, which have no UNet cross-attention. "
    "With a refiner, the steps after the switch get the prompt with the class words, without the concepts: "
    "AlignIT does not reach the refiner."
)


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

    def ui(self, is_img2img: bool) -> list:
        tab = "img2img" if is_img2img else "txt2img"
        with gr.Accordion(TITLE, open=False, elem_id=f"alignit_{tab}"):
            enabled = gr.Checkbox(False, label="Enable AlignIT", elem_id=f"alignit_{tab}_enabled")
            note = gr.Markdown(MODELS, elem_id=f"alignit_{tab}_note")
            rows = []
            for i in range(alignit_args.ROWS):
                with gr.Row():
                    rows.append(
                        gr.Textbox(
                            label=f"Trigger {i + 1}",
                            placeholder="<sks> or an embedding's name",
                            max_lines=1,
                            elem_id=f"alignit_{tab}_trigger_{i}",
                        )
                    )
                    rows.append(
                        gr.Textbox(label="Class word", placeholder="cat", max_lines=1, elem_id=f"alignit_{tab}_class_{i}")
                    )
                    rows.append(
                        gr.Dropdown(
                            label="Source: embedding, lora:NAME[:WEIGHT] or cd:NAME (empty: the trigger's name)",
                            choices=HOST.source_choices(),
                            value="",
                            allow_custom_value=True,
                            elem_id=f"alignit_{tab}_source_{i}",
                        )
                    )
                    rows.append(
                        gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", elem_id=f"alignit_{tab}_strength_{i}")
                    )
            with gr.Row():
                step_start = gr.Slider(
                    0.0, 1.0, value=0.0, step=0.01, label="From step (fraction)", elem_id=f"alignit_{tab}_start"
                )
                step_end = gr.Slider(0.0, 1.0, value=1.0, step=0.01, label="To step (fraction)", elem_id=f"alignit_{tab}_end")
                placeholder = gr.Textbox("*", label="Placeholder word", max_lines=1, elem_id=f"alignit_{tab}_placeholder")
                lora_scope = gr.Radio(
                    choices=["kv", "full"],
                    value="kv",
                    label="LoRA scope (kv: on the concept's keys/values only; full: on the whole UNet)",
                    elem_id=f"alignit_{tab}_lora_scope",
                )
                refresh = gr.Button("Refresh sources", elem_id=f"alignit_{tab}_refresh")
            maps = self.maps_ui(tab)
        sources = rows[2 :: len(alignit_args.ROW_FIELDS)]
        refresh.click(lambda: [gr.update(choices=HOST.source_choices()) for _ in sources], inputs=[], outputs=sources)
        enabled.change(lambda _: gr.update(value=model_note()), inputs=[enabled], outputs=[note])

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
