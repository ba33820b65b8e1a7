"""The ComfyUI host (alignit.hosts.comfyui) against the contract in tests/contract/comfy, run as ComfyUI runs it
(tests/comfy_flow.py). By the definition: the concept rows are the rows ComfyUI computes for p' with the concept (a
LoRA's text part merged by ComfyUI's own loader), every other row is p's (CLIP Text Encode of the class-word prompt);
the keys and values of the concept rows are ``lerp(W·c_class, (W + ΔW)·c', s)`` (Custom Diffusion: ``W_cd·c'``),
every other row's and every uncond row's are the plain ones; nothing is left on the input MODEL or CLIP."""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import comfy_flow
import folder_paths
import pytest
import torch
import torch.nn.functional as F
from comfy.sd import load_lora_for_models
from comfy_flow import clip_text_encode, concepts, kv_recorder, sample, text_encode
from ldm_parts import alive, tiny_sd15_unet, weights_digest
from safetensors.torch import save_file
from server import PromptServer
from weight_files import cd_state, lora_state, random_cd_weights, random_factors, random_text_factors

from alignit.attn2_slots import block_key, cond_batch_rows
from alignit.hosts.comfyui import nodes
from alignit.hosts.comfyui.attention import Replace
from alignit.hosts.comfyui.encoder import ComfyEncoder, sd_streams
from alignit.kv import KVRewriter
from alignit.kv_hooks import attn2_modules

ROOT = Path(__file__).resolve().parents[1]
EMBEDDING = ("<sks>", "cat", "embeddings/sks.safetensors")
LORA = ("ohwx", "man", "loras/ohwx.safetensors")
CD = ("<new1> cat", "cat", "custom_diffusion/mycat.bin")
STAR = 265  # "*</w>", the default placeholder
ATTN1 = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"


class _Reduce:
    """Pickles as ``func(*args)``: what a hostile file asks the unpickler to call."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _lora_file(path: Path, factors: dict, text: dict, attn1: tuple | None = None) -> None:
    state = {}
    for (layer, proj), (down, up, alpha) in factors.items():
        base = "lora_unet_" + f"{layer}.to_{proj}".replace(".", "_")
        state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha}
    for name, (down, up, alpha) in text.items():
        base = "lora_te_text_model_" + name.replace(".", "_")
        state |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha}
    if attn1 is not None:
        base = "lora_unet_" + ATTN1.replace(".", "_")
        state |= {f"{base}.lora_down.weight": attn1[0], f"{base}.lora_up.weight": attn1[1]}
    save_file(state, str(path))


@pytest.fixture
def comfy(text_model, vectors, tmp_path):
    folder_paths.use_models_dir(str(tmp_path))
    nodes.sources.register_custom_diffusion_folder()
    for folder in ("embeddings", "loras", "custom_diffusion"):
        (tmp_path / folder).mkdir()
    unet = alive(tiny_sd15_unet())
    checkpoint = comfy_flow.sd15(text_model, unet)
    save_file({"emb_params": vectors(2)}, str(tmp_path / "embeddings" / "sks.safetensors"))
    save_file({"emb_params": vectors(1, seed=4)}, str(tmp_path / "embeddings" / "one.safetensors"))
    save_file({"emb_params": vectors(3, seed=5)}, str(tmp_path / "embeddings" / "style.safetensors"))
    factors, text = random_factors(unet), random_text_factors(text_model)
    attn1 = (torch.randn(2, 32) * 0.3, torch.randn(32, 2) * 0.3)
    _lora_file(tmp_path / "loras" / "ohwx.safetensors", factors, text, attn1)
    cd_weights = random_cd_weights(unet)
    modifier = torch.randn(1, 32, generator=torch.Generator().manual_seed(9))
    torch.save(cd_state(cd_weights, modifier, "delta_bin"), tmp_path / "custom_diffusion" / "mycat.bin")
    PromptServer.instance.progress_texts.clear()
    return SimpleNamespace(
        checkpoint=checkpoint, unet=unet, text_model=text_model, factors=factors, text=text, attn1=attn1, cd=cd_weights,
        modifier=modifier, folder=tmp_path, vectors=vectors,
    )  # fmt: skip


def dummy(tokens_before: int, concept: list, after: int, weights=None, end=49407, pad=49407, placeholder=None):
    """p' in ComfyUI's form, written by hand: start, placeholders for the words before, the concept, placeholders for
    the words after, end, padding; each with the weight of the token it stands for."""
    star = placeholder if placeholder is not None else STAR
    tokens = [49406] + [star] * tokens_before + concept + [star] * after + [end]
    tokens += [pad] * (77 - len(tokens))
    weights = weights or [1.0] * 77
    return [(token, weight) for token, weight in zip(tokens, weights)]


def _same(a, b) -> bool:
    """Two ``(token or vector, weight)`` entries are the same."""
    if torch.is_tensor(a[0]) or torch.is_tensor(b[0]):
        return torch.is_tensor(a[0]) and torch.is_tensor(b[0]) and torch.equal(a[0], b[0]) and a[1] == b[1]
    return a == b


def rows(comfy, tokens) -> torch.Tensor:
    with torch.no_grad():
        return comfy.checkpoint.clip.encode_from_tokens({"l": [tokens]})[0]


def test_placeholder_id(tokenizer):
    assert tokenizer("*")["input_ids"][1:-1] == [STAR]


def test_embedding_concept_rows_by_the_definition(comfy):
    """Two vectors for one class token: rows 4-5 are p' with the vectors (each with the class word's weight 1.2),
    every other row is p's; the row after the class word moves down by one, into the padding."""
    cond, model, messages = text_encode(comfy.checkpoint, "a photo of (<sks>:1.2) playing", concepts(EMBEDDING))
    assert messages == [] and model is comfy.checkpoint.model
    plain = clip_text_encode(comfy.checkpoint.clip, "a photo of (cat:1.2) playing")[0][0][0]
    got = cond[0][0][0]
    vectors = comfy.vectors(2)
    weights = [1.0] * 4 + [1.2, 1.2] + [1.0] * 71
    concept = rows(comfy, dummy(3, [vectors[0], vectors[1]], 1, weights))[4:6]
    assert torch.equal(got[4:6], concept)
    assert torch.equal(got[:4], plain[:4]) and torch.equal(got[6:76], plain[5:75]) and torch.equal(got[76], plain[76])
    assert cond[0][1].keys() == {"pooled_output"} and torch.equal(
        cond[0][1]["pooled_output"],
        clip_text_encode(comfy.checkpoint.clip, "a photo of (cat:1.2) playing")[0][1]["pooled_output"],
    )


def cat_rows(comfy, text) -> list[tuple[int, int]]:
    """(chunk, row) of every ``cat`` token in ComfyUI's tokens of ``text``."""
    cat = comfy.checkpoint.clip.tokenizer.clip_l.tokenizer("cat")["input_ids"][1]
    chunks = comfy.checkpoint.clip.tokenize(text)["l"]
    return [
        (c, r)
        for c, chunk in enumerate(chunks)
        for r, (token, _) in enumerate(chunk)
        if not torch.is_tensor(token) and token == cat
    ]


LONG = ", ".join(["a detailed painting of a garden with flowers"] * 9)


@pytest.mark.parametrize(
    "prompt",
    [
        "a (<sks>:1.3) playing (badminton), ((sharp focus)) and \\(literal\\) <sks>",
        "embedding:style a <sks> in embedding:style the garden",
        "a photo of embedding:style, <sks> on a sofa",
        LONG + ", <sks> at the end",
        "(" + LONG + " with a <sks> inside:1.1)",
        "my<sks>'s toy\nand <sks>",
    ],
)
def test_class_words_land_where_comfyui_puts_them(comfy, prompt):
    """A one-vector concept changes exactly the rows where ComfyUI's own tokens of p hold the class word."""
    chain = concepts(("<sks>", "cat", "embeddings/one.safetensors"))
    cond, _, messages = text_encode(comfy.checkpoint, prompt, chain)
    assert messages == []
    text = prompt.replace("<sks>", "cat").replace("mycat", "my cat")
    plain = clip_text_encode(comfy.checkpoint.clip, text)[0][0][0]
    where = cat_rows(comfy, text)
    differs = (cond[0][0][0] != plain).any(-1).nonzero().flatten().tolist()
    assert where and differs == [77 * c + r for c, r in where]


def test_a_layout_comfyui_does_not_share_is_refused(comfy):
    """``dog.`` before a comma: ComfyUI's tokenizer reads ``.,`` as one token, which AlignIT cannot split."""
    text = "a photo of <sks>, playing"
    cond, model, messages = text_encode(comfy.checkpoint, text, concepts(("<sks>", "dog.", "embeddings/one.safetensors")))
    assert len(messages) == 1 and "differently from ComfyUI" in messages[0] and "encoding without AlignIT" in messages[0]
    assert torch.equal(cond[0][0], clip_text_encode(comfy.checkpoint.clip, text)[0][0]) and model is comfy.checkpoint.model


def test_a_class_word_split_across_chunks_goes_to_the_first(comfy):
    """A segment of 8 tokens or more is split at the chunk's end; the concept takes the class word's first part."""
    words = " ".join(["flowers"] * 73)
    prompt = f"({words} black <sks> on grass:1.1)"
    chain = concepts(("<sks>", "cat playing badminton", "embeddings/one.safetensors"))
    cond, _, messages = text_encode(comfy.checkpoint, prompt, chain)
    assert messages == []
    plain = clip_text_encode(comfy.checkpoint.clip, prompt.replace("<sks>", "cat playing badminton"))[0][0][0]
    got = cond[0][0][0]
    assert torch.equal(got[:75], plain[:75]) and not torch.equal(got[75], plain[75]) and torch.equal(got[76], plain[76])
    # The second chunk gives up the rows of "playing badminton" (1, 2); its final row fills the end, as for n < m.
    assert torch.equal(got[77:78], plain[77:78]) and torch.equal(got[78:152], plain[80:154])
    assert torch.equal(got[152:154], plain[153:154].expand(2, -1))


@pytest.fixture
def calls():
    return []


def run(comfy, text, chain=None, negative="a photo of man", record=None, **options):
    """CONDITIONING, MODEL and messages of AlignIT Text Encode (plain CLIP Text Encode without ``chain``), sampled
    with an earlier node's recording attn2 patches on the input model."""
    model = kv_recorder(comfy.checkpoint.model, record if record is not None else [])
    checkpoint = SimpleNamespace(clip=comfy.checkpoint.clip, model=model)
    if chain is None:
        cond, out, messages = clip_text_encode(comfy.checkpoint.clip, text), model, []
    else:
        cond, out, messages = text_encode(checkpoint, text, chain, **options)
    sample(out, cond, clip_text_encode(comfy.checkpoint.clip, negative), steps=2)
    return cond, out, messages


def check_kv(on, off, strength, c_prime, concept_rows, weight, delta):
    """Every projection call: uncond rows bit for bit the plain ones; cond rows too but the concept's (at
    ``concept_rows``, where the plain context holds c_class), which are ``lerp(W·c_class, W·c' + Δ(c'), s)``."""
    assert len(on) == len(off) and on
    for (key, context, out, order), (plain_key, plain_context, plain_out, plain_order) in zip(on, off):
        assert key == plain_key and order == plain_order == (1, 0)
        assert torch.equal(out[0], plain_out[0]), key  # uncond
        differs = (context[1] != plain_context[1]).any(-1)
        assert torch.equal(out[1][~differs], plain_out[1][~differs]), key
        if strength == 0:
            assert not differs.any()
            continue
        assert differs.nonzero().flatten().tolist() == concept_rows, key
        w = weight(key)
        c_class = plain_context[1][concept_rows]
        want = torch.lerp(F.linear(c_class, w), F.linear(c_prime, w) + delta(key, c_prime), strength)
        torch.testing.assert_close(out[1][differs], want, rtol=1e-5, atol=1e-5)


def lora_delta(comfy, weight=0.8):
    def delta(key, x):
        down, up, alpha = comfy.factors[key]
        return F.linear(F.linear(x, down), up) * float(alpha) / down.shape[0] * weight

    return delta


@pytest.mark.parametrize("scope", ["kv", "full"])
@pytest.mark.parametrize("strength", [0.0, 0.5, 1.0])
def test_lora_concept_by_the_definition(comfy, scope, strength):
    on, off = [], []
    row = LORA + (strength,)
    options = {"lora_weight": 0.8, "lora_scope": scope}
    cond, model, messages = run(comfy, "a photo of (ohwx:1.3) playing", concepts(row, **options), record=on)
    assert messages == []
    run(comfy, "a photo of (man:1.3) playing", record=off)
    # The concept row: p' encoded by a CLIP carrying the LoRA's text part, merged by ComfyUI's own loader.
    lora_sd = {k: v for k, v in _read(comfy.folder / "loras" / "ohwx.safetensors").items()}
    _, clip_lora = load_lora_for_models(None, comfy.checkpoint.clip, lora_sd, 0.0, 0.8)
    ohwx = comfy.checkpoint.clip.tokenizer.clip_l.tokenizer("ohwx")["input_ids"][1:-1]
    weights = [1.0] * 4 + [1.3] + [1.0] * 72
    assert len(ohwx) == 1
    with torch.no_grad():
        c_prime = clip_lora.encode_from_tokens({"l": [dummy(3, ohwx, 1, weights)]})[0][4:5]
    assert not torch.equal(c_prime, rows(comfy, dummy(3, ohwx, 1, weights))[4:5])  # the text part counts
    plain = clip_text_encode(comfy.checkpoint.clip, "a photo of (man:1.3) playing")[0][0][0]
    want = torch.cat([plain[:4], torch.lerp(plain[4:5], c_prime, strength), plain[5:]]) if strength else plain
    assert torch.equal(cond[0][0][0], want)
    check_kv(on, off, strength, c_prime, [4], lambda key: attn2_modules(comfy.unet)[key].weight, lora_delta(comfy))
    if scope == "full":
        assert list(model.patches) == [f"diffusion_model.{ATTN1}.weight"]
        (patch,) = model.patches[f"diffusion_model.{ATTN1}.weight"]
        assert patch[0] == 0.8 and torch.equal(patch[1].weights[0], comfy.attn1[1])
    else:
        assert model.patches == {}
    assert comfy.checkpoint.model.patches == {} and comfy.checkpoint.clip.patcher.patches == {}


def _read(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_custom_diffusion_concept_by_the_definition(comfy, strength):
    """``<new1> cat`` with the modifier token's vector: keys/values ``lerp(W·c_class, W_cd·c', s)`` at its rows."""
    on, off = [], []
    cond, _, messages = run(comfy, "a photo of <new1> cat playing", concepts(CD + (strength,)), record=on)
    assert messages == []
    run(comfy, "a photo of cat playing", record=off)
    cat = comfy.checkpoint.clip.tokenizer.clip_l.tokenizer("cat")["input_ids"][1:-1]
    c_prime = rows(comfy, dummy(3, [comfy.modifier[0], *cat], 1))[4:6]
    plain = clip_text_encode(comfy.checkpoint.clip, "a photo of cat playing")[0][0][0]
    blended = torch.lerp(plain[[4, 4]], c_prime, strength)
    assert torch.equal(cond[0][0][0][4:6], blended) and torch.equal(cond[0][0][0][6:76], plain[5:75])
    modules = attn2_modules(comfy.unet)
    for (key, _, out, _), (_, plain_context, plain_out, _) in zip(on, off):
        assert torch.equal(out[0], plain_out[0]) and torch.equal(out[1][:4], plain_out[1][:4]), key
        w = modules[key].weight
        want = torch.lerp(F.linear(plain_context[1][[4, 4]], w), F.linear(c_prime, comfy.cd[key]), strength)
        torch.testing.assert_close(out[1][4:6], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(out[1][6:76], plain_out[1][5:75]), key


def test_an_earlier_replace_patch_is_wrapped_and_a_later_one_told_where_to_go(comfy):
    calls = []
    _, model, _ = run(comfy, "a photo of ohwx playing", concepts(LORA), record=calls)
    assert len(calls) == 2 * 2 * 16  # two steps, k and v of the 16 layers: the earlier patch ran in every layer
    earlier = kv_recorder(comfy.checkpoint.model, []).model_options["transformer_options"]["patches_replace"]["attn2"]
    replaced = model.model_options["transformer_options"]["patches_replace"]["attn2"]
    keys = {block_key(layer) for layer, _ in attn2_modules(comfy.unet)}
    assert set(replaced) == keys | {key[:2] for key in keys}
    assert all(isinstance(patch, Replace) for patch in replaced.values())
    assert all(replaced[key].layer is not None and replaced[key].inner.__code__ is earlier[key[:2]].__code__ for key in keys)
    assert all(replaced[key[:2]].layer is None and replaced[key[:2]].inner.__code__ is earlier[key[:2]].__code__ for key in keys)
    for key in (("input", 1, 0), ("input", 1)):  # IPAdapterPlus.py set_model_patch_replace, SDXL and SD1.x keys
        with pytest.raises(RuntimeError, match="connect that node .* before AlignIT Text Encode"):
            replaced[key].add(lambda *a: None, weight=1.0)


def test_a_clone_of_the_output_model_keeps_the_patches(comfy):
    """ComfyUI deep-copies ``model_options`` at every clone: AlignIT's state is shared, the wrapped patch copied as it
    would be without AlignIT, and the clone rewrites the same keys and values."""

    class Earlier:  # a patch object, as IPAdapter's Attn2Replace
        def __call__(self, q, k, v, extra):
            return comfy_flow.optimized_attention(q, k, v, extra["n_heads"])

    model = comfy.checkpoint.model.clone()
    model.set_model_attn2_replace(Earlier(), "input", 1)
    checkpoint = SimpleNamespace(clip=comfy.checkpoint.clip, model=model)
    cond, out, _ = text_encode(checkpoint, "a photo of ohwx playing", concepts(LORA))
    clone = out.clone()
    ours = out.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    theirs = clone.model_options["transformer_options"]["patches_replace"]["attn2"][("input", 1, 0)]
    assert theirs is not ours and theirs.patch is ours.patch
    assert isinstance(theirs.inner, Earlier) and theirs.inner is not ours.inner
    negative = clip_text_encode(comfy.checkpoint.clip, "x")
    first, second, plain = sample(out, cond, negative), sample(clone, cond, negative), sample(model, cond, negative)
    assert all(torch.equal(a, b) for x, y in zip(first, second) for a, b in zip(x, y))
    assert not torch.equal(first[0][0], plain[0][0])


def test_uncond_rows_are_never_rewritten(comfy):
    """AlignIT's conditioning as the negative prompt too: bit for bit the same chunks, but cond_or_uncond says uncond."""
    on, off = [], []
    checkpoint = SimpleNamespace(clip=comfy.checkpoint.clip, model=kv_recorder(comfy.checkpoint.model, on))
    cond, model, _ = text_encode(checkpoint, "a photo of ohwx playing", concepts(LORA))
    sample(model, cond, cond)
    sample(kv_recorder(comfy.checkpoint.model, off), cond, cond)
    assert len(on) == len(off) == 2 * 2 * 16
    for (key, _, out, order), (_, _, plain_out, _) in zip(on, off):
        assert order == (1, 0) and torch.equal(out[0], plain_out[0]) and not torch.equal(out[1], plain_out[1]), key


def test_cond_batch_rows():
    assert cond_batch_rows({"cond_or_uncond": [1, 0]}, 4).tolist() == [2, 3]
    assert cond_batch_rows({"cond_or_uncond": [0, 1, 0]}, 3).tolist() == [0, 2]
    assert cond_batch_rows({}, 2) is None
    assert block_key("middle_block.1.transformer_blocks.3.attn2") == ("middle", 0, 3)
    assert block_key("output_blocks.11.1.transformer_blocks.0.attn2") == ("output", 11, 0)


def test_nothing_is_left_on_the_input_model_and_clip(comfy):
    checkpoint = comfy.checkpoint
    options = copy.deepcopy(checkpoint.model.model_options)
    unet_before, text_before = weights_digest(comfy.unet), weights_digest(comfy.text_model)
    plain_before = clip_text_encode(checkpoint.clip, "a photo of man playing")
    images_before = sample(checkpoint.model, plain_before, clip_text_encode(checkpoint.clip, "x"))
    rows_ = (EMBEDDING, LORA, CD)
    cond, model, messages = text_encode(checkpoint, "a <sks> and ohwx and a <new1> cat", concepts(*rows_, lora_scope="full"))
    assert messages == [] and model is not checkpoint.model
    sample(model, cond, clip_text_encode(checkpoint.clip, "x"))
    assert checkpoint.model.model_options == options and checkpoint.model.patches == {} and checkpoint.clip.patcher.patches == {}
    plain_after = clip_text_encode(checkpoint.clip, "a photo of man playing")
    images_after = sample(checkpoint.model, plain_after, clip_text_encode(checkpoint.clip, "x"))
    assert weights_digest(comfy.unet) == unet_before and weights_digest(comfy.text_model) == text_before
    assert torch.equal(plain_after[0][0], plain_before[0][0])
    assert all(torch.equal(a, b) for step_a, step_b in zip(images_after, images_before) for a, b in zip(step_a, step_b))


def test_step_range(comfy):
    """AlignIT's entry in [start, end], p's own outside: the sampler sees the concept only in the range."""
    cond, model, _ = text_encode(comfy.checkpoint, "a photo of ohwx playing", concepts(LORA), start=0.2, end=0.6)
    plain = clip_text_encode(comfy.checkpoint.clip, "a photo of man playing")
    assert [(e[1]["start_percent"], e[1]["end_percent"]) for e in cond] == [(0.2, 0.6), (0.0, 0.2), (0.6, 1.0)]
    assert torch.equal(cond[1][0], plain[0][0]) and torch.equal(cond[2][0], plain[0][0])
    assert not torch.equal(cond[0][0], plain[0][0])
    record: list = []
    sample(model, cond, clip_text_encode(comfy.checkpoint.clip, "x"), steps=4, record=record)
    used = [[entry is cond[0] for entry in entries] for entries, _ in record]
    assert used == [[False], [True], [True], [False]]  # the steps at 0, 0.25, 0.5 and 0.75 of the schedule


def test_messages_reach_the_node_and_the_console(comfy, caplog):
    with caplog.at_level(logging.WARNING, logger="alignit"):
        _, _, messages = text_encode(comfy.checkpoint, "a cat", concepts(EMBEDDING))
    assert messages == [
        "AlignIT: concept '<sks>': its trigger is not in the text; this concept is left out",
        "AlignIT: no usable concept; encoding without AlignIT",
    ]
    assert PromptServer.instance.progress_texts == [("\n".join(messages), "5")]
    assert [r.getMessage() for r in caplog.records] == messages


@pytest.mark.parametrize(
    "row, text, expected",
    [
        (
            ("<sks>", "cat", "embeddings/missing.safetensors"),
            "a <sks>",
            "no file 'missing.safetensors' in ComfyUI's embeddings folder",
        ),
        (("<sks>", "cat", "loras/missing.safetensors"), "a <sks>", "no file 'missing.safetensors' in ComfyUI's loras folder"),
        (("<sks>", "cat", "embeddings/sks.safetensors"), "a dog", "its trigger is not in the text"),
        (("<sks>", "cat", "embeddings/evil.pt"), "a <sks>", "cannot read evil.pt: refused global"),
        (("<sks>", "", "embeddings/sks.safetensors"), "a <sks>", "the class word is empty"),
        (
            ("<sks>", "cat", "checkpoints/x.safetensors"),
            "a <sks>",
            "names no file of ComfyUI's embeddings, loras or custom_diffusion",
        ),
        (("<sks>", "cat", "embeddings/wide.safetensors"), "a <sks>", "made for another model family"),
        (("<new1> cat", "cat", "custom_diffusion/broken.bin"), "a <new1> cat", "cannot read broken.bin"),
        (("ohwx", "man", "loras/ia3.safetensors"), "a ohwx", "holds (IA)³ modules, which ComfyUI's LoRA loader does not read"),
    ],
)
def test_bad_concepts_leave_the_plain_conditioning(comfy, row, text, expected, tmp_path):
    marker = tmp_path / "ran"
    torch.save({"string_to_param": {"*": _Reduce(os.system, f"touch '{marker}'")}}, comfy.folder / "embeddings" / "evil.pt")
    save_file({"emb_params": torch.ones(1, 768)}, str(comfy.folder / "embeddings" / "wide.safetensors"))
    (comfy.folder / "custom_diffusion" / "broken.bin").write_bytes(b"not a delta")
    ia3 = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k"
    save_file(
        {f"{ia3}.weight": torch.ones(320), f"{ia3}.on_input": torch.tensor(False)},
        str(comfy.folder / "loras" / "ia3.safetensors"),
    )
    cond, model, messages = text_encode(comfy.checkpoint, text, concepts(row))
    assert expected in messages[0] and messages[-1] == "AlignIT: no usable concept; encoding without AlignIT"
    assert all("\n" not in message for message in messages)
    assert torch.equal(cond[0][0], clip_text_encode(comfy.checkpoint.clip, text)[0][0]) and model is comfy.checkpoint.model
    assert not marker.exists()


def test_a_bad_concept_leaves_the_others(comfy):
    cond, _, messages = text_encode(
        comfy.checkpoint, "a <sks> and a <nope>", concepts(EMBEDDING, ("<nope>", "dog", "loras/x.pt"))
    )
    assert messages == ["AlignIT: concept '<nope>': no file 'x.pt' in ComfyUI's loras folder; this concept is left out"]
    plain = clip_text_encode(comfy.checkpoint.clip, "a cat and a <nope>")[0][0][0]
    assert torch.equal(cond[0][0][0][:2], plain[:2]) and not torch.equal(cond[0][0][0][2], plain[2])


def test_other_model_families_pass_through(comfy, monkeypatch):
    clip = comfy.checkpoint.clip
    real = clip.tokenize
    monkeypatch.setattr(clip, "tokenize", lambda text, *a, **k: {**real(text, *a, **k), "t5xxl": [[(1, 1.0)]]})
    checkpoint = SimpleNamespace(clip=clip, model=comfy.checkpoint.model)
    cond, model, messages = text_encode(checkpoint, "a <sks>", concepts(EMBEDDING))
    assert messages == [
        "AlignIT: AlignIT applies to SD1.x, SD2.x and SDXL; this CLIP (SD1ClipModel, text encoders l, t5xxl) is another "
        "model family's; encoding without AlignIT"
    ]
    assert model is comfy.checkpoint.model and len(cond) == 1
    monkeypatch.undo()
    flux = SimpleNamespace(model=SimpleNamespace(diffusion_model=torch.nn.Linear(1, 1)))
    _, model, messages = text_encode(SimpleNamespace(clip=comfy.checkpoint.clip, model=flux), "a <sks>", concepts(EMBEDDING))
    assert "this MODEL (Linear) has no UNet cross-attention" in messages[0] and model is flux


def test_no_clip_is_an_error_as_in_clip_text_encode(comfy):
    with pytest.raises(RuntimeError, match="clip input is invalid: None"):
        nodes.AlignITTextEncode().encode(None, comfy.checkpoint.model, "a <sks>", concepts(EMBEDDING))


def test_a_failure_inside_the_patch_costs_the_weights_not_the_image(comfy, monkeypatch, caplog):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    cond, model, _ = text_encode(comfy.checkpoint, "a photo of ohwx playing", concepts(LORA))
    monkeypatch.setattr(KVRewriter, "rewrite", broken)
    with caplog.at_level(logging.ERROR, logger="alignit"):
        images = sample(model, cond, clip_text_encode(comfy.checkpoint.clip, "x"))
    assert len(images) == 2 and "rewriting keys/values" in caplog.text


def test_sdxl(tmp_path):
    """Both text encoders: p' through CLIP-L and OpenCLIP-G (padded with 0), the embedding's clip_l and clip_g vectors;
    a LoRA's text parts for both (``lora_te1_``, ``lora_te2_``) on p' only, merged as ComfyUI's loader merges them."""
    folder_paths.use_models_dir(str(tmp_path))
    (tmp_path / "embeddings").mkdir()
    model_l, model_g = comfy_flow.sdxl_text_models()
    checkpoint = comfy_flow.sdxl(model_l, model_g, comfy_flow.sdxl_unet())
    generator = torch.Generator().manual_seed(3)
    vectors = {"clip_l": torch.randn(2, 32, generator=generator), "clip_g": torch.randn(2, 48, generator=generator)}
    save_file(vectors, str(tmp_path / "embeddings" / "xl.safetensors"))
    cond, _, messages = text_encode(
        checkpoint, "a photo of (<sks>:0.9) playing", concepts(("<sks>", "cat", "embeddings/xl.safetensors"))
    )
    assert messages == []
    plain = clip_text_encode(checkpoint.clip, "a photo of (cat:0.9) playing")[0][0][0]
    weights = [1.0] * 4 + [0.9, 0.9] + [1.0] * 71
    tokens_l = dummy(3, list(vectors["clip_l"]), 1, weights)
    tokens_g = dummy(3, list(vectors["clip_g"]), 1, weights, pad=0)
    with torch.no_grad():
        concept = checkpoint.clip.encode_from_tokens({"g": [tokens_g], "l": [tokens_l]})[0][4:6]
    got = cond[0][0][0]
    assert got.shape[-1] == 80 and torch.equal(got[4:6], concept) and torch.equal(got[6:76], plain[5:75])
    # p' in the form ComfyUI's own tokenizer gives such a prompt: G padded with 0, the vectors at the class word
    own = checkpoint.clip.tokenize("* * * (embedding:xl:0.9) *")
    encoder = ComfyEncoder(checkpoint.clip, sd_streams(checkpoint.clip))
    handle = {"l": vectors["clip_l"], "g": vectors["clip_g"]}
    lists = encoder.token_lists([t for t, _ in tokens_l[:4]] + [0, 0] + [t for t, _ in tokens_l[6:]], weights, [(3, handle)])
    assert lists.keys() == own.keys()
    for name in own:
        assert all(_same(a, b) for a, b in zip(lists[name][0], own[name][0], strict=True)), name
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "embeddings" / "sd15.safetensors"))
    _, _, messages = text_encode(checkpoint, "a <sks>", concepts(("<sks>", "cat", "embeddings/sd15.safetensors")))
    assert "32-wide vectors where this model's clip_g needs 48" in messages[0]

    (tmp_path / "loras").mkdir()
    lora = {}
    for prefix, width in (("lora_te1", 32), ("lora_te2", 48)):
        base = f"{prefix}_text_model_encoder_layers_0_self_attn_q_proj"
        lora |= {f"{base}.lora_down.weight": torch.randn(2, width, generator=generator), f"{base}.alpha": torch.tensor(2.0)}
        lora[f"{base}.lora_up.weight"] = torch.randn(width, 2, generator=generator)
    save_file(lora, str(tmp_path / "loras" / "xl.safetensors"))
    cond, model, messages = text_encode(checkpoint, "a photo of ohwx", concepts(("ohwx", "man", "loras/xl.safetensors")))
    assert messages == [] and model is checkpoint.model  # a text part only: no K/V, no MODEL clone
    _, clip_lora = load_lora_for_models(None, checkpoint.clip, lora, 0.0, 1.0)
    assert len(clip_lora.patcher.patches) == 2
    ohwx = checkpoint.clip.tokenizer.clip_l.tokenizer("ohwx")["input_ids"][1:-1]
    with torch.no_grad():
        c_prime = clip_lora.encode_from_tokens({"g": [dummy(3, ohwx, 0, pad=0)], "l": [dummy(3, ohwx, 0)]})[0][4]
        unpatched = checkpoint.clip.encode_from_tokens({"g": [dummy(3, ohwx, 0, pad=0)], "l": [dummy(3, ohwx, 0)]})[0][4]
    assert torch.equal(cond[0][0][0][4], c_prime)
    assert (c_prime[:32] != unpatched[:32]).any() and (c_prime[32:] != unpatched[32:]).any()


def test_node_declarations(comfy):
    """ComfyUI's V1 node API: every input has a tooltip; the category; the sources listed from the folders."""
    for cls in (nodes.AlignITConcept, nodes.AlignITTextEncode):
        assert cls.CATEGORY == "conditioning/alignit" and cls.DESCRIPTION
        declared = cls.INPUT_TYPES()
        for group in ("required", "optional"):
            for name, (_, options) in declared[group].items():
                assert options.get("tooltip"), (cls.__name__, name)
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
    choices = nodes.AlignITConcept.INPUT_TYPES()["required"]["source"][0]
    assert choices == [
        "embeddings/one.safetensors",
        "embeddings/sks.safetensors",
        "embeddings/style.safetensors",
        "loras/ohwx.safetensors",
        "custom_diffusion/mycat.bin",
    ]
    assert nodes.AlignITConcept.VALIDATE_INPUTS("anything") is True
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS == {"AlignITConcept": "AlignIT Concept", "AlignITTextEncode": "AlignIT Text Encode"}


def test_the_checkout_loads_as_comfyui_loads_a_node_pack():
    """nodes.py 2135-2191: the folder's __init__.py under its path as module name, NODE_CLASS_MAPPINGS read."""
    name = str(ROOT).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        assert set(module.NODE_CLASS_MAPPINGS) == {"AlignITConcept", "AlignITTextEncode"}
        assert module.NODE_CLASS_MAPPINGS["AlignITTextEncode"].FUNCTION == "encode"
    finally:
        for loaded in [key for key in sys.modules if key == name or key.startswith(name + ".")]:
            del sys.modules[loaded]


@pytest.mark.parametrize("package", ["", "alignit_checkout"])
def test_the_checkout_imports_without_comfyui_and_without_nodes(package, monkeypatch):
    """pytest imports the root __init__.py as the package of the tests' root folder (as a plain module when the
    folder's name is no identifier) in environments without ComfyUI: it must import nothing then."""
    monkeypatch.delitem(sys.modules, "folder_paths")
    spec = importlib.util.spec_from_file_location(package or "__init__", ROOT / "__init__.py")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = package
    spec.loader.exec_module(module)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")


def test_loha_parts_are_merged_by_comfyuis_maths(comfy):
    """A LyCORIS LoHa on the cross-attention K/V: ``ΔW = s·(α/r)·(w1a@w1b)*(w2a@w2b)``, ComfyUI's adapter maths."""
    state, deltas = {}, {}
    for (layer, proj), (down, up, alpha) in comfy.factors.items():
        base = "lora_unet_" + f"{layer}.to_{proj}".replace(".", "_")
        state |= {f"{base}.hada_w1_a": up, f"{base}.hada_w1_b": down, f"{base}.alpha": alpha}
        state |= {f"{base}.hada_w2_a": up * 0.5, f"{base}.hada_w2_b": down.clone()}
        deltas[(layer, proj)] = float(alpha) / down.shape[0] * 0.7 * ((up @ down) * ((up * 0.5) @ down))
    save_file(state, str(comfy.folder / "loras" / "loha.safetensors"))
    on, off = [], []
    cond, _, messages = run(
        comfy, "a photo of ohwx playing", concepts(("ohwx", "man", "loras/loha.safetensors"), lora_weight=0.7), record=on
    )
    run(comfy, "a photo of man playing", record=off)
    assert messages == []
    c_prime = cond[0][0][0][4:5].clone()  # c' at strength 1 (its rows by the definition: test_lora_concept_by_the_definition)
    check_kv(
        on, off, 1.0, c_prime, [4], lambda key: attn2_modules(comfy.unet)[key].weight, lambda key, x: F.linear(x, deltas[key])
    )


def test_lora_keys_comfyui_does_not_map_are_reported(comfy):
    """diffusers' own LoRA files (``unet.…attn2.to_k.lora_A``): ComfyUI 0.8.0's key maps miss their UNet part, and
    AlignIT says so; their text part still reaches p'."""
    save_file(lora_state(comfy.factors, comfy.text, "peft"), str(comfy.folder / "loras" / "peft.safetensors"))
    cond, model, messages = text_encode(comfy.checkpoint, "a photo of ohwx", concepts(("ohwx", "man", "loras/peft.safetensors")))
    assert messages == [
        "AlignIT: LoRA 'peft.safetensors': ComfyUI's key maps match 0 of its 32 cross-attention K/V parts; the others are "
        "left out, as Load LoRA leaves them out"
    ]
    assert model is comfy.checkpoint.model and not torch.equal(
        cond[0][0], clip_text_encode(comfy.checkpoint.clip, "a photo of man")[0][0]
    )
