"""The order in which A1111 v1.10.1 runs a generation, driven against the contract in tests/contract/modules.

Mirrors modules/processing.py: ``process`` (915) → per batch: prompts sliced (943), ``before_process_batch`` (952),
extra networks parsed and activated (957-961; the Lora extension patches the weights in place with a backup),
``process_batch`` (964), ``setup_conds`` (966, with ``get_conds_with_caching`` 460-491 and the class-level caches),
``process_before_every_sampling`` (1338) and sampling, hires pass: ``calculate_hr_conds`` (1499-1511) then
``process_before_every_sampling`` again (1446), then ``postprocess_batch`` (1017) with the decoded images; after every
batch ``postprocess`` (1149) with the ``Processed`` result. The sampler asks ``reconstruct_multicond_batch`` and
``reconstruct_cond_batch`` for the conditioning of every step, calls the ``cfg_denoiser`` callbacks (214) and runs the
UNet on cond ‖ uncond in one batch when their lengths agree, else separately (sd_samplers_cfg_denoiser.py 168-169,
232-250). A nested ``processing.process_images`` (what "compare" runs) is this same flow."""

from __future__ import annotations

import contextlib
import itertools
from types import SimpleNamespace
from typing import Any, TypeVar

import network
import networks
import torch
from modules import (  # the contract (tests/contract)
    extra_networks,
    processing,
    prompt_parser,
    script_callbacks,
    sd_hijack,
    sd_hijack_clip,
    sd_hijack_open_clip,
    shared,
)

from alignit.hosts.webui import a1111, flow, maps
from alignit.kv_hooks import attn2_modules
from alignit.sources.lora import load_lora

_jobs = itertools.count(1)
HOST = a1111.A1111Host()


class FakeModel:
    """``shared.sd_model`` of an SD1 checkpoint: ``cond_stage_model`` and ``get_learned_conditioning``."""

    def __init__(self, text_model, tokenizer, unet=None):
        self.cond_stage_model = sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(text_model, tokenizer, sd_hijack.model_hijack)
        self.unet = unet
        self.model = SimpleNamespace(diffusion_model=unet)

    def get_learned_conditioning(self, texts):
        with torch.no_grad():
            return self.cond_stage_model(texts)


class FakeSDXLModel:
    """``shared.sd_model`` of an SDXL checkpoint: ``cond_stage_model`` is the conditioner with the two text embedders
    (CLIP-L over a transformers model, OpenCLIP-G over an open_clip text tower, ``clip_parts.OpenClipText``);
    ``get_learned_conditioning`` (sd_models_xl.py:12) returns ``crossattn`` (CLIP-L ‖ OpenCLIP-G rows) and the
    pooled ``vector`` (here OpenCLIP-G's EOS row of the first chunk and the size embeddings' zeros)."""

    def __init__(self, model_l, model_g, tokenizer, unet=None):
        hijack = sd_hijack.model_hijack
        self.cond_stage_model = SimpleNamespace(
            embedders=[
                sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords(model_l, tokenizer, hijack, "clip_l"),
                sd_hijack_open_clip.FrozenOpenCLIPEmbedder2WithCustomWords(model_g, tokenizer, hijack),
                SimpleNamespace(),  # the size and crop embedders
            ]
        )
        self.unet = unet
        self.model = SimpleNamespace(diffusion_model=unet)

    def get_learned_conditioning(self, texts):
        clip_l, clip_g = self.cond_stage_model.embedders[:2]
        with torch.no_grad():
            rows_l, rows_g = clip_l(texts), clip_g(texts)
        vector = torch.cat([rows_g[:, 76], torch.zeros(rows_g.shape[0], 8)], dim=-1)
        return {"crossattn": torch.cat([rows_l, rows_g], dim=-1), "vector": vector}


class Processing:
    """The parts of ``StableDiffusionProcessingTxt2Img`` a generation touches."""

    cached_c = [None, None]
    cached_uc = [None, None]
    cached_hr_c = [None, None]

    def __init__(self, prompts, steps=10, batch_size=1, negative="", hr_prompts=None, hr_steps=None, sampler_name="Euler"):
        self.prompt, self.negative_prompt = list(prompts), negative
        self.hr_prompt = self.hr_negative_prompt = None
        self.all_prompts = list(prompts)
        self.all_negative_prompts = [negative] * len(prompts)
        self.all_hr_prompts = list(hr_prompts) if hr_prompts else None
        self.all_hr_negative_prompts = [negative] * len(prompts) if hr_prompts else None
        self.seed = self.subseed = -1
        self.all_seeds = self.all_subseeds = list(range(len(prompts)))
        self.styles: list[str] = []
        self.do_not_save_samples = self.do_not_save_grid = False
        self.script_args: list = []
        self.enable_hr = hr_prompts is not None
        self.hr_second_pass_steps = hr_steps or 0
        self.hr_sampler_name = None
        self.batch_size = batch_size
        self.steps = steps
        self.sampler_name = sampler_name
        self.comments: dict[str, int] = {}
        self.extra_generation_params: dict[str, str] = {}
        self.is_hr_pass = False
        self.sampled: list[list[Any]] = []
        self.extra_network_data: dict = {}
        self.hr_extra_network_data: dict = {}
        self.fail_at_step: int | None = None
        self.refiner: Any = None  # a model the sampler switches to at ``refiner_switch_at``
        self.refiner_switch_at = 1.0
        self.refiner_checkpoint_info = None

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        """processing.py 418-435, 1474-1497: a list given as the prompt (what "compare" pins) is taken as it is."""
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        if isinstance(self.negative_prompt, list):
            self.all_negative_prompts = self.negative_prompt
        if isinstance(self.hr_prompt, list):
            self.all_hr_prompts = self.hr_prompt
        if isinstance(self.hr_negative_prompt, list):
            self.all_hr_negative_prompts = self.hr_negative_prompt
        if isinstance(self.seed, list):
            self.all_seeds = self.seed

    def _cached(self, function, prompts, steps, caches, hires_steps=None):
        key = (tuple(prompts), steps, hires_steps, shared.opts.emphasis, id(shared.sd_model))  # 448: checkpoint info
        for cache in caches:
            if cache[0] == key:
                return cache[1]
        caches[0][1] = function(shared.sd_model, prompts, steps, hires_steps)
        caches[0][0] = key
        return caches[0][1]

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts)
        negatives = prompt_parser.SdConditioning(self.negative_prompts, is_negative_prompt=True)
        self.uc = self._cached(prompt_parser.get_learned_conditioning, negatives, self.steps, [self.cached_uc])
        self.c = self._cached(prompt_parser.get_multicond_learned_conditioning, prompts, self.steps, [self.cached_c])

    def calculate_hr_conds(self):
        prompts = prompt_parser.SdConditioning(self.hr_prompts)
        hires = self.hr_second_pass_steps or self.steps
        self.hr_c = self._cached(
            prompt_parser.get_multicond_learned_conditioning, prompts, self.steps, [self.cached_hr_c, self.cached_c], hires
        )

    def sample(self, c, steps):
        """The conditioning each step hands to the UNet (and the UNet's outputs when there is one)."""
        outputs = []
        for step in range(steps):
            if step == self.fail_at_step:
                raise RuntimeError("sampling failed")
            if self.refiner is not None and shared.sd_model is not self.refiner and step / steps >= self.refiner_switch_at:
                # sd_samplers_common.py 158-202 apply_refiner (switch by sampling steps): the refiner's weights are
                # loaded, the conds set up anew; the denoiser then takes p's new c (cfg_denoiser.py 160-162)
                shared.sd_model = self.refiner
                self.setup_conds()
                c = self.c
            _, cond = prompt_parser.reconstruct_multicond_batch(c, step)
            outputs.append(cond)
            unet = shared.sd_model.unet
            if unet is None:
                continue
            uncond_cond = prompt_parser.reconstruct_cond_batch(self.uc, step)
            params = script_callbacks.CFGDenoiserParams(None, None, None, step, steps, cond, uncond_cond)
            script_callbacks.cfg_denoiser_callback(params)
            tensor, uncond = crossattn(cond), crossattn(uncond_cond)
            contexts = [torch.cat([tensor, uncond])] if tensor.shape[1] == uncond.shape[1] else [tensor, uncond]
            with torch.no_grad():
                outputs.append(torch.cat([run_unet(unet, context, step) for context in contexts]))
        self.sampled.append(outputs)


class Processed:
    """modules/processing.py ``Processed``: the images (a grid first when ``index_of_first_image`` is 1) and their
    infotexts, as ``postprocess`` receives them."""

    def __init__(self, images, infotexts):
        self.images, self.infotexts, self.index_of_first_image = images, infotexts, 0


def decoded(p, batch: int) -> torch.Tensor:
    """The batch's images as ``postprocess_batch`` gets them: (B, 3, H, W) in [0, 1] (here a plain grey per seed)."""
    seeds = p.all_seeds[batch * p.batch_size : (batch + 1) * p.batch_size]
    return torch.stack([torch.full((3, 32, 32), 0.25 + 0.5 * (seed % 2)) for seed in seeds])


def crossattn(cond):
    return cond["crossattn"] if isinstance(cond, dict) else cond


def run_unet(unet, context, seed):
    x = torch.randn(context.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    return unet(x, torch.full((context.shape[0],), 500), context=context)


@contextlib.contextmanager
def loras_applied(data: dict):
    """The Lora extension's effect on the UNet: ``W += ΔW`` in place, restored afterwards; a plain LoRA's ``ΔW`` is
    ``unet_multiplier · α/r · up @ down``, another type's comes from its network module's ``calc_updown`` on the
    original weight (networks.py network_apply_weights, 455-474)."""
    modules = attn2_modules(shared.sd_model.unet) if shared.sd_model.unet is not None else {}
    backup = {}
    with torch.no_grad():
        for params in data.get("lora", []):
            name, *multipliers = params.items
            te = float(multipliers[0]) if multipliers else 1.0
            unet = float(multipliers[1]) if len(multipliers) > 1 else te
            lora = load_lora(networks.available_network_aliases[name].filename)
            net = network.Network(name, None)
            net.unet_multiplier = unet
            for key in [*lora.kv, *lora.kv_parts]:
                weight = modules[key].weight
                original = backup.setdefault(key, weight.clone())
                if key in lora.kv:
                    weight += unet * lora.kv[key].scale * (lora.kv[key].up @ lora.kv[key].down)
                    continue
                parts = network.NetworkWeights(key[0], key[0], dict(lora.kv_parts[key]), modules[key])
                made = next(m for kind in networks.module_types if (m := kind.create_module(net, parts)) is not None)
                weight += made.calc_updown(original)[0]
    try:
        yield
    finally:
        with torch.no_grad():
            for key, weight in backup.items():
                modules[key].weight.copy_(weight)


def script_args(*rows, enabled=True, start=0.0, end=1.0, placeholder="*", scope="kv") -> list:
    """The script's positional arguments, as the UI sends them: settings, then concept rows."""
    return [enabled, start, end, placeholder, scope, *[cell for row in rows for cell in row]]


class Order:
    """Where a WebUI's generation order departs from A1111's (these defaults): Forge overrides it."""

    host = HOST
    hires_calls = 1  # process_before_every_sampling calls per hires pass

    def batch_start(self, p) -> None:
        """Before the batch's prompts are sliced."""

    def networks_activated(self, p) -> None:
        """After extra networks are activated, before process_batch."""

    def sampling_call(self, p, hires: bool, call: int) -> None:
        """Before AlignIT's process_before_every_sampling: resets, and earlier scripts' hooks."""


P = TypeVar("P", bound=Processing)


def generate(p: P, script_args=None, order: Order | None = None) -> P:
    """One txt2img run; ``script_args`` None means the extension is not installed at all. A nested run of ``p``'s copy
    (``processing.process_images``) goes through the same order; ``p.processed`` is the result ``postprocess`` saw."""
    order = order or Order()
    processing.runner = lambda nested: generate(nested, nested.script_args, order).processed
    if not getattr(p, maps.NESTED_ATTRIBUTE, False):  # a nested run belongs to the job that runs it
        shared.state.job_timestamp = str(next(_jobs))
    p.sampled = []
    p.setup_prompts()
    hooks = script_args is not None
    if hooks:
        p.script_args = list(script_args)
        flow.process(p, order.host, p.script_args)
    for n in range(0, len(p.all_prompts), p.batch_size):
        order.batch_start(p)
        p.prompts = p.all_prompts[n : n + p.batch_size]
        p.negative_prompts = p.all_negative_prompts[n : n + p.batch_size]
        if hooks:
            flow.set_lora_tags(p)
        p.prompts, p.extra_network_data = extra_networks.parse_prompts(p.prompts)
        if p.enable_hr:
            p.hr_prompts, p.hr_extra_network_data = extra_networks.parse_prompts(p.all_hr_prompts[n : n + p.batch_size])
        with loras_applied(p.extra_network_data):
            order.networks_activated(p)
            if hooks:
                flow.prepare_batch(p)
            p.setup_conds()
            order.sampling_call(p, hires=False, call=0)
            if hooks:
                flow.before_sampling(p, p.c)
            p.sample(p.c, p.steps)
        if p.enable_hr:
            with loras_applied(p.hr_extra_network_data):
                p.is_hr_pass = True
                p.calculate_hr_conds()
                for call in range(order.hires_calls):
                    order.sampling_call(p, hires=True, call=call)
                    if hooks:
                        flow.before_sampling(p, p.hr_c)
                p.sample(p.hr_c, p.hr_second_pass_steps or p.steps)
                p.is_hr_pass = False
        if hooks:
            flow.finish_batch(p, decoded(p, n // p.batch_size))
    p.processed = Processed([f"image {i}" for i in range(len(p.all_prompts))], [f"info {i}" for i in range(len(p.all_prompts))])
    if hooks:
        flow.finish(p, p.processed, (0, len(p.script_args)))
    return p
