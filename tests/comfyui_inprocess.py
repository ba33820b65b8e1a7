"""AlignIT by the definition on ComfyUI's own modules, in process: run with ComfyUI's Python by
tests/test_comfyui_integration.py (``python comfyui_inprocess.py COMFYUI_DIR CHECKOUT``); exits 0 when every check
holds, printing one line per check.

A real ``comfy.sd.CLIP`` (SD1.x tokenizer and text model, two layers at CLIP-L's width) and a real SD1.5-layout
``comfy.ldm`` UNet at 32 channels, random weights, sampled by ComfyUI's own ``comfy.sample.sample``. The checks of
tests/test_comfyui_glue.py, here on the code the contract mirrors: the concept rows are ComfyUI's rows of p' (written
by hand as ComfyUI's token lists, a LoRA's text part merged by ComfyUI's ``load_lora_for_models``), every other row
is p's; the class words land where ComfyUI's tokenizer puts them; the keys and values ComfyUI's cross-attention gets
are ``lerp(W·c_class, (W + ΔW)·c', s)`` at the concept rows of the cond batch and the plain ones everywhere else;
a plain sample is bit for bit the same before and after.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import tempfile

COMFY, ROOT = sys.argv[1], sys.argv[2]
sys.path.insert(0, COMFY)
os.chdir(COMFY)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]

import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.sd1_clip  # noqa: E402
import comfy.supported_models  # noqa: E402
import comfy.supported_models_base  # noqa: E402
import folder_paths  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from comfy.ldm.modules.attention import optimized_attention  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ATTN2 = re.compile(r"^diffusion_model\.(?:(input|output)_blocks\.(\d+)|middle_block)\.1\.transformer_blocks\.(\d+)\.attn2$")
UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 32, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "transformer_depth_output": [1] * 9 + [0] * 3,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip
STAR = 265  # "*</w>"
generator = torch.Generator().manual_seed(0)
torch.set_grad_enabled(False)


def randomize(module: torch.nn.Module) -> None:
    """ComfyUI builds its models uninitialised (comfy.ops): random weights, norms near 1."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            values = torch.randn(parameter.shape, generator=generator) * 0.05
            if "norm" in name and name.endswith("weight"):
                values += 1.0
            parameter.copy_(values.to(parameter.dtype))


def load_pack():
    """The checkout as ComfyUI loads a node pack (nodes.py 2135-2156); its ``flow`` and ``nodes`` modules."""
    spec = importlib.util.spec_from_file_location(ROOT, os.path.join(ROOT, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[ROOT] = module
    spec.loader.exec_module(module)
    return sys.modules[f"{ROOT}.alignit.hosts.comfyui.nodes"]


def check(name: str, condition: bool) -> None:
    assert condition, name
    print("ok", name, flush=True)


tmp = tempfile.mkdtemp()
for folder in ("embeddings", "loras"):
    os.makedirs(os.path.join(tmp, folder))
    folder_paths.add_model_folder_path(folder, os.path.join(tmp, folder), is_default=True)
nodes = load_pack()

target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
config = {"num_hidden_layers": 2, "intermediate_size": 256, "num_attention_heads": 4}
clip = comfy.sd.CLIP(
    target, embedding_directory=folder_paths.get_folder_paths("embeddings"), model_options={"clip_l_model_config": config}
)
randomize(clip.cond_stage_model)
model_config = comfy.supported_models.SD15(UNET)
model_config.set_inference_dtype(torch.float32, None)
base = model_config.get_model({})
randomize(base)
model = comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
modules = {name: module for name, module in base.named_modules() if ATTN2.match(name)}

vectors = torch.randn(2, 768, generator=generator) * 0.3
save_file({"emb_params": vectors}, os.path.join(tmp, "embeddings", "sks.safetensors"))
save_file({"emb_params": torch.randn(1, 768, generator=generator) * 0.3}, os.path.join(tmp, "embeddings", "one.safetensors"))
save_file({"emb_params": torch.randn(3, 768, generator=generator) * 0.3}, os.path.join(tmp, "embeddings", "style.safetensors"))
factors, lora = {}, {}
for name, module in modules.items():
    layer = name[len("diffusion_model.") :]
    for proj in "kv":
        out, inp = getattr(module, f"to_{proj}").weight.shape
        down, up = torch.randn(2, inp, generator=generator) * 0.3, torch.randn(out, 2, generator=generator) * 0.3
        factors[(layer, proj)] = (down, up)
        base_key = "lora_unet_" + f"{layer}.to_{proj}".replace(".", "_")
        lora |= {f"{base_key}.lora_down.weight": down, f"{base_key}.lora_up.weight": up, f"{base_key}.alpha": torch.tensor(1.0)}
for layer in range(2):
    for proj in ("q_proj", "v_proj"):
        base_key = f"lora_te_text_model_encoder_layers_{layer}_self_attn_{proj}"
        lora[f"{base_key}.lora_down.weight"] = torch.randn(2, 768, generator=generator) * 0.1
        lora[f"{base_key}.lora_up.weight"] = torch.randn(768, 2, generator=generator) * 0.1
save_file(lora, os.path.join(tmp, "loras", "ohwx.safetensors"))


def concepts(*rows, **options):
    chain = None
    for trigger, class_word, source, *strength in rows:
        (chain,) = nodes.AlignITConcept().add(trigger, class_word, source, strength[0] if strength else 1.0, chain, **options)
    return chain


def text_encode(text, chain, model=model, **options):
    with torch.inference_mode():
        out = nodes.AlignITTextEncode().encode(clip, model, text, chain, **options)
    return (*out["result"], out.get("ui", {}).get("text", []))


def plain(text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def dummy(before, concept, after, weights=None, pad=49407):
    tokens = [49406] + [STAR] * before + concept + [STAR] * after + [49407]
    tokens += [pad] * (77 - len(tokens))
    return list(zip(tokens, weights or [1.0] * 77))


def encode(tokens, with_clip=clip):
    with torch.inference_mode():
        return with_clip.encode_from_tokens({"l": [tokens]})[0]


def recorder(model, calls):
    """An earlier node's patches: the context of each block and the k/v its replace patch gets (IPAdapter's keys)."""
    clone, contexts = model.clone(), []
    clone.set_model_attn2_patch(lambda n, context, value, extra: (contexts.append(context), (n, context, value))[1])
    for name in modules:
        kind, number, _ = ATTN2.match(name).groups()
        layer_name = name.removeprefix("diffusion_model.")

        def replace(q, k, v, extra, layer=layer_name):
            order = tuple(extra["cond_or_uncond"])
            calls.extend([((layer, "k"), contexts[-1], k.clone(), order), ((layer, "v"), contexts[-1], v.clone(), order)])
            return optimized_attention(q, k, v, extra["n_heads"])

        clone.set_model_attn2_replace(replace, kind or "middle", int(number or 0))
    return clone


def sample(model, positive, negative):
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        return comfy.sample.sample(model, noise, 2, 7.0, "euler", "normal", positive, negative, latent, seed=7, disable_pbar=True)


negative = plain("blurry")
before = sample(model, plain("a photo of man playing"), negative)

# The embedding concept: rows 4-5 are p' with its two vectors at the class word's weight, the rest p's.
cond, out_model, said = text_encode("a photo of (<sks>:1.2) playing", concepts(("<sks>", "cat", "embeddings/sks.safetensors")))
p = plain("a photo of (cat:1.2) playing")[0][0][0]
concept = encode(dummy(3, [vectors[0], vectors[1]], 1, [1.0] * 4 + [1.2, 1.2] + [1.0] * 71))[4:6]
got = cond[0][0][0]
check("embedding: concept rows are ComfyUI's rows of p'", said == [] and torch.equal(got[4:6], concept))
check(
    "embedding: every other row is p's",
    torch.equal(got[:4], p[:4]) and torch.equal(got[6:76], p[5:75]) and torch.equal(got[76], p[76]),
)
check("embedding: no MODEL clone", out_model is model)

# Where the class words land: a one-vector concept changes exactly the rows of ComfyUI's own "cat" tokens.
cat = clip.tokenizer.clip_l.tokenizer("cat")["input_ids"][1]
long = ", ".join(["a detailed painting of a garden with flowers"] * 9)
for text in [
    "a (<sks>:1.3) playing (badminton), ((sharp focus)) and \\(literal\\) <sks>",
    "embedding:style a <sks> in embedding:style the garden",
    long + ", <sks> at the end",
    "(" + long + " with a <sks> inside:1.1)",
    "my<sks>'s toy\nand <sks>, café 東京 😀",
]:
    cond, _, said = text_encode(text, concepts(("<sks>", "cat", "embeddings/one.safetensors")))
    p_text = text.replace("<sks>", "cat").replace("mycat", "my cat")
    chunks = clip.tokenize(p_text)["l"]
    where = [
        77 * c + r for c, chunk in enumerate(chunks) for r, (t, _) in enumerate(chunk) if not torch.is_tensor(t) and t == cat
    ]
    differs = (cond[0][0][0] != plain(p_text)[0][0][0]).any(-1).nonzero().flatten().tolist()
    check(f"layout: {text[:40]!r}", said == [] and where and differs == where)

# A LoRA in the "kv" scope at strength 0.5: the text part on p' only (merged by ComfyUI's loader), keys and values
# lerp(W·c_class, (W + ΔW)·c', s) at the concept row of the cond batch, the plain ones everywhere else.
on, off = [], []
chain = concepts(("ohwx", "man", "loras/ohwx.safetensors", 0.5), lora_weight=0.8)
cond, out_model, said = text_encode("a photo of (ohwx:1.3) playing", chain, model=recorder(model, on))
sample(out_model, cond, negative)
p = plain("a photo of (man:1.3) playing")
sample(recorder(model, off), p, negative)
ohwx = clip.tokenizer.clip_l.tokenizer("ohwx")["input_ids"][1:-1]
lora_sd = {key: value.clone() for key, value in lora.items()}
_, clip_lora = comfy.sd.load_lora_for_models(None, clip, lora_sd, 0.0, 0.8)
weights = [1.0] * 4 + [1.3] + [1.0] * 72
c_prime = encode(dummy(3, ohwx, 1, weights), clip_lora)[4:5]
check("lora: the text part counts", len(ohwx) == 1 and not torch.equal(c_prime, encode(dummy(3, ohwx, 1, weights))[4:5]))
want = torch.cat([p[0][0][0][:4], torch.lerp(p[0][0][0][4:5], c_prime, 0.5), p[0][0][0][5:]])
check("lora: the conditioning by the definition", said == [] and torch.equal(cond[0][0][0], want))
check(f"lora: the same projection calls ({len(on)}, {len(off)})", len(on) == len(off) == 2 * 2 * 16)
for (key, _, k, order), (_, context, plain_k, plain_order) in zip(on, off):
    assert order == plain_order
    cond_row = order.index(0)
    for row in range(len(order)):
        if row != cond_row:
            assert torch.equal(k[row], plain_k[row]), key
    differs = (k[cond_row] != plain_k[cond_row]).any(-1)
    assert differs.nonzero().flatten().tolist() == [4], key
    w = getattr(modules["diffusion_model." + key[0]], f"to_{key[1]}").weight
    down, up = factors[key]
    wanted = torch.lerp(
        F.linear(context[cond_row][4:5], w), F.linear(c_prime, w) + F.linear(F.linear(c_prime, down), up) * 0.5 * 0.8, 0.5
    )
    torch.testing.assert_close(k[cond_row][4:5], wanted, rtol=1e-4, atol=1e-5)
check("lora: keys and values by the definition in all 16 layers, uncond rows untouched", True)

after = sample(model, plain("a photo of man playing "), negative)
check("a plain sample is bit for bit the same before and after", torch.equal(before, after))
check("the input MODEL has no patch", model.model_options["transformer_options"] == {} and not model.patches)
check("the input CLIP has no patch", not clip.patcher.patches)
