"""A test probe installed into a real WebUI (A1111 or Forge) by ``tests/webui_server.py`` for one run, then removed.

It answers with the WebUI's own results and knows nothing of AlignIT:

- ``POST /alignit-probe/layouts`` ``{"texts": [...], "emphasis": "Original", "comma_backtrack": 20}``: per text, per
  text encoder of the loaded model (``clip_l``; SDXL: ``clip_l``, ``clip_g``), the chunks the WebUI's own
  ``tokenize_line`` returns (tokens, multipliers, fixes as ``[offset, embedding name]``) under those settings (A1111
  reads ``opts.emphasis`` and ``opts.comma_padding_backtrack``; Forge reads the engine's ``emphasis`` and fixes the
  backtrack at 20, so it refuses another value). The settings are restored afterwards.
- ``POST /alignit-probe/schedules`` ``{"prompts": [...], "steps": 20}``: per prompt, per AND part, its weight and the
  schedule ``[[end_at_step, text]]`` of the WebUI's own ``prompt_parser``: the texts its ``tokenize_line`` is given.
- ``POST /alignit-probe/kv/arm`` ``{"path": FILE}`` then a generation, then ``POST /alignit-probe/kv/collect``: the
  keys and values every cross-attention layer's attention received during that generation, per UNet call, saved to
  FILE (safetensors); the answer lists, per UNet call, which batch items were cond (0) and uncond (1), the dtype
  the attention received and, per ``layer.k``/``layer.v``, which distinct tensor of the file it was (equal tensors
  are stored once), and the dtype each projection's weight is stored in.
  A1111: forward hooks on every ``attn2.to_k``/``to_v``, moved behind any other hook at every sampling step (the
  WebUI's attention takes the projections' outputs as they leave the last hook); cond/uncond by comparing each batch
  item's context with the negative conditioning the sampler had. Forge: the ``k``/``v`` handed to the attention
  function (``backend.attention.attention_function``, looked up at call time by the unpatched ``CrossAttention`` and
  at patch time by attn2 replace patches), tagged with the layer whose ``to_v`` ran last; cond/uncond from the UNet
  call's ``transformer_options["cond_or_uncond"]``.
"""

from __future__ import annotations

import contextlib
import json

import torch
from fastapi import Body
from modules import prompt_parser, script_callbacks, shared
from modules.call_queue import queue_lock

try:
    from backend import attention as forge_attention
    from backend.nn import unet as forge_unet
    from backend.text_processing import emphasis as forge_emphasis
    from backend.text_processing import parsing as forge_parsing

    FORGE = True
except ImportError:
    FORGE = False


def _loaded_model():
    if FORGE:
        from modules import sd_models

        return sd_models.forge_model_reload()[0]
    return shared.sd_model


def _text_encoders(model) -> list:
    """The WebUI objects whose ``tokenize_line`` lays out prompts, named by their embedding key."""
    if FORGE:
        for names in (["text_processing_engine"], ["text_processing_engine_l", "text_processing_engine_g"]):
            engines = [getattr(model, name, None) for name in names]
            if all(engines):
                return list(zip(["clip_l", "clip_g"], engines))
        raise RuntimeError(f"no classic text engine on {type(model).__name__}")
    candidates = getattr(model.cond_stage_model, "embedders", None) or [model.cond_stage_model]
    found = [e for e in candidates if hasattr(e, "tokenize_line")]
    return list(zip(["clip_l", "clip_g"], found))


@contextlib.contextmanager
def _settings(encoders: list, emphasis: str, backtrack: int):
    if FORGE:
        if backtrack != 20:
            raise ValueError("Forge's tokenize_line fixes the comma backtrack at 20")
        kept = [engine.emphasis for _, engine in encoders]
        for _, engine in encoders:
            engine.emphasis = forge_emphasis.get_current_option(emphasis)()
        try:
            yield
        finally:
            for (_, engine), old in zip(encoders, kept):
                engine.emphasis = old
        return
    kept = {"emphasis": shared.opts.emphasis, "comma_padding_backtrack": shared.opts.comma_padding_backtrack}
    shared.opts.data.update(emphasis=emphasis, comma_padding_backtrack=backtrack)
    try:
        yield
    finally:
        shared.opts.data.update(kept)


def _chunk(chunk) -> dict:
    return {
        "tokens": [int(t) for t in chunk.tokens],
        "multipliers": [float(m) for m in chunk.multipliers],
        "fixes": [[int(fix.offset), fix.embedding.name] for fix in chunk.fixes],
    }


def _fragments(encoder, text: str) -> list:
    """What ``tokenize_line`` tokenizes first (A1111 sd_hijack_clip.py:88-93, Forge classic_engine.py:151-153): the
    WebUI's attention fragments of ``text`` and their tokens, from the WebUI's own parser and tokenizer."""
    if FORGE:
        parsed = forge_parsing.parse_prompt_attention(text, encoder.emphasis.name)
    else:
        parsed = prompt_parser.parse_prompt_attention(text) if shared.opts.emphasis != "None" else [[text, 1.0]]
    return [[fragment, weight, tokens] for (fragment, weight), tokens in zip(parsed, encoder.tokenize([t for t, _ in parsed]))]


def layouts(payload: dict = Body(...)) -> dict:  # noqa: B008 - FastAPI's way
    with queue_lock:
        model = _loaded_model()
        encoders = _text_encoders(model)
        with _settings(encoders, payload.get("emphasis", "Original"), int(payload.get("comma_backtrack", 20))):
            out = [
                {
                    name: {"chunks": [_chunk(c) for c in encoder.tokenize_line(text)[0]], "fragments": _fragments(encoder, text)}
                    for name, encoder in encoders
                }
                for text in payload["texts"]
            ]
    return {"encoders": [name for name, _ in encoders], "classes": [type(e).__name__ for _, e in encoders], "layouts": out}


def schedules(payload: dict = Body(...)) -> dict:  # noqa: B008
    steps = int(payload.get("steps", 20))
    out = []
    for prompt in payload["prompts"]:
        indexes, flat, _ = prompt_parser.get_multicond_prompt_list([prompt])
        per_text = prompt_parser.get_learned_conditioning_prompt_schedules(flat, steps, None, shared.opts.use_old_scheduling)
        out.append(
            [{"weight": weight, "schedule": [[end, text] for end, text in per_text[index]]} for index, weight in indexes[0]]
        )
    return {"schedules": out}


class KVRecorder:
    """What the attention of every cross-attention layer received during one generation."""

    def __init__(self, path: str):
        self.path = path
        self.calls: list[dict] = []
        self.distinct: dict[str, list[torch.Tensor]] = {}
        self.uncond: torch.Tensor | None = None
        self.pending_layer: str | None = None
        self.handles: list = []
        self.forge_original = None
        unet = _loaded_model()
        self.unet = unet.forge_objects.unet.model.diffusion_model if FORGE else unet.model.diffusion_model
        self.attn2 = {name[: -len(".attn2")]: module for name, module in self.unet.named_modules() if name.endswith(".attn2")}
        self.weights = {
            f"{layer}.{proj}": str(getattr(module, f"to_{proj}").weight.dtype).replace("torch.", "")
            for layer, module in self.attn2.items()
            for proj in "kv"
        }
        self.handles.append(self.unet.register_forward_pre_hook(self._unet_call, with_kwargs=True))
        if FORGE:
            for layer, module in self.attn2.items():
                self.handles.append(module.to_v.register_forward_hook(self._tag(layer)))
            self.forge_original = forge_attention.attention_function
            forge_attention.attention_function = forge_unet.attention_function = self._forge_attention
        else:
            self._hook_projections()

    # -- per UNet call
    def _unet_call(self, module, args, kwargs):
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        if FORGE:
            order = list(kwargs.get("transformer_options", {}).get("cond_or_uncond", []))
            size = context.shape[0] // max(len(order), 1)
            order = [kind for kind in order for _ in range(size)]
        else:
            uncond = self.uncond
            order = [int(uncond is not None and any(torch.equal(item, u) for u in uncond)) for item in context]
        self.calls.append({"order": order, "kv": {}})

    def _record(self, key: str, tensor: torch.Tensor) -> None:
        if not self.calls:
            return
        versions = self.distinct.setdefault(key, [])
        value = tensor.detach().float().cpu().clone()
        index = next((i for i, old in enumerate(versions) if torch.equal(old, value)), None)
        if index is None:
            versions.append(value)
            index = len(versions) - 1
        self.calls[-1]["kv"][key] = index
        self.calls[-1]["dtype"] = str(tensor.dtype).replace("torch.", "")

    # -- A1111: hooks on the projections, kept behind any other hook
    def _hook_projections(self) -> None:
        for layer, module in self.attn2.items():
            for proj in "kv":
                self.handles.append(getattr(module, f"to_{proj}").register_forward_hook(self._projection(f"{layer}.{proj}")))

    def _projection(self, key: str):
        def hook(module, inputs, output):
            self._record(key, output)

        return hook

    def before_step(self, params) -> None:
        uncond = params.text_uncond["crossattn"] if isinstance(params.text_uncond, dict) else params.text_uncond
        self.uncond = uncond
        if not FORGE:
            keep, self.handles = self.handles[:1], self.handles[1:]
            for handle in self.handles:
                handle.remove()
            self.handles = keep
            self._hook_projections()

    # -- Forge: the attention function's inputs
    def _tag(self, layer: str):
        def hook(module, inputs, output):
            self.pending_layer = layer

        return hook

    def _forge_attention(self, q, k, v, *args, **kwargs):
        layer, self.pending_layer = self.pending_layer, None
        if layer is not None:
            self._record(f"{layer}.k", k)
            self._record(f"{layer}.v", v)
        return self.forge_original(q, k, v, *args, **kwargs)

    def close(self) -> dict:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        if FORGE and self.forge_original is not None:
            forge_attention.attention_function = forge_unet.attention_function = self.forge_original
        from safetensors.torch import save_file

        tensors = {f"{key}#{i}": value for key, versions in self.distinct.items() for i, value in enumerate(versions)}
        save_file(tensors, self.path, metadata={"calls": json.dumps(self.calls)})
        return {"path": self.path, "calls": self.calls, "weights": self.weights}


_recorder: KVRecorder | None = None


def kv_arm(payload: dict = Body(...)) -> dict:  # noqa: B008
    global _recorder
    with queue_lock:
        if _recorder is not None:
            _recorder.close()
        _recorder = KVRecorder(payload["path"])
    return {"armed": True}


def kv_collect() -> dict:
    global _recorder
    recorder, _recorder = _recorder, None
    if recorder is None:
        raise RuntimeError("the K/V recorder was not armed")
    return recorder.close()


def _before_step(params) -> None:
    if _recorder is not None:
        _recorder.before_step(params)


def _routes(_demo, app) -> None:
    app.add_api_route("/alignit-probe/layouts", layouts, methods=["POST"])
    app.add_api_route("/alignit-probe/schedules", schedules, methods=["POST"])
    app.add_api_route("/alignit-probe/kv/arm", kv_arm, methods=["POST"])
    app.add_api_route("/alignit-probe/kv/collect", kv_collect, methods=["POST"])


script_callbacks.on_app_started(_routes)
script_callbacks.on_cfg_denoiser(_before_step)
