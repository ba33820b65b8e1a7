"""K/V rewriting on the real ldm UNet, by the definition: at strength s the concept rows of a marked chunk get
``lerp(W·c_class, (W+ΔW)·c', s)`` (Custom Diffusion: ``lerp(W·c_class, W_cd·c', s)``); every other row of every
batch item keeps ``W·c`` bit for bit, whatever its values."""

import copy

import pytest
import torch
import torch.nn.functional as F
from ldm_parts import tiny_sd15_unet, weights_digest
from sync_counter import SyncCounter
from weight_files import random_cd_weights, random_factors

from alignit.errors import ConceptError
from alignit.kv import ConceptRows, KVRewriter, LowRank, MarkedChunk, Replacement, check_fits
from alignit.kv_hooks import KVInjector, attn2_modules
from alignit.text_lora import text_lora

POSITIONS = (2, 3)  # the concept's rows in its chunk


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet()


def rows(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def concept():
    """c', the class word's rows c_class, and the rest of the prompt's chunk."""
    return rows(2, 4), rows(2, 5), rows(77, 6)


def spliced(concept, strength: float) -> torch.Tensor:
    """The chunk as the splice writes it: the class word's rows blended towards c' by the strength."""
    c_prime, c_class, chunk = concept
    chunk = chunk.clone()
    chunk[list(POSITIONS)] = torch.lerp(c_class, c_prime, strength)
    return chunk


def marked(concept, strength: float) -> MarkedChunk:
    return MarkedChunk(spliced(concept, strength), (ConceptRows(0, POSITIONS, concept[0], strength),))


def context_of(concept, strength: float) -> torch.Tensor:
    """Batch: [the prompt with the concept ‖ a second chunk of it], [another prompt whose rows 2-3 are c' but whose
    chunk is not the spliced one], [uncond holding c' and the class rows elsewhere]."""
    c_prime, c_class, chunk = concept
    first = torch.cat([spliced(concept, strength), chunk])
    other = torch.cat([rows(77, 7), rows(77, 8)])
    other[list(POSITIONS)] = c_prime
    other[77 + 10 : 77 + 12] = spliced(concept, strength)[list(POSITIONS)]
    uncond = torch.cat([rows(77, 9), rows(77, 10)])
    uncond[30:32] = c_prime
    return torch.stack([first, other, uncond])


CONCEPT_AT = [(0, p) for p in POSITIONS]


def projections(unet, context):
    """Every attn2 to_k/to_v output of one UNet call, by (layer, proj), after any earlier hooks."""
    seen = {}
    modules = attn2_modules(unet)
    handles = [m.register_forward_hook(lambda m, i, o, k=key: seen.setdefault(k, o.clone())) for key, m in modules.items()]
    try:
        with torch.no_grad():
            unet(torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(6)), torch.full((3,), 500), context=context)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def lora(unet, multiplier=1.0):
    return {key: LowRank(down, up, float(alpha) / 2).times(multiplier) for key, (down, up, alpha) in random_factors(unet).items()}


def other_rows(shape) -> torch.Tensor:
    mask = torch.ones(shape[:2], dtype=torch.bool)
    for b, t in CONCEPT_AT:
        mask[b, t] = False
    return mask


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.0])
def test_lora_kv_scope(unet, concept, strength):
    c_prime, c_class, _ = concept
    context = context_of(concept, strength)
    before = weights_digest(unet)
    plain = projections(unet, context)
    kv = lora(unet, 0.8)
    chunks = [marked(concept, strength)] if strength else []  # the splicer keeps no chunk at strength 0
    with KVInjector(unet, chunks, [kv]) as injector:
        hooked = projections(unet, context)
    assert not injector.installed and not injector.unmatched_layers()
    assert len(hooked) == 32  # 16 layers x (to_k, to_v)
    for key, out in hooked.items():
        weight = attn2_modules(unet)[key].weight
        want = torch.lerp(F.linear(c_class, weight), F.linear(c_prime, weight) + kv[key].delta(c_prime), strength)
        got = out[0, list(POSITIONS)]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        others = other_rows(out.shape)
        assert torch.equal(out[others], plain[key][others])  # aliased rows, the second chunk, uncond: W·c bit for bit
        if strength == 0.0:
            assert torch.equal(out, plain[key])
    assert weights_digest(unet) == before
    assert all(torch.equal(a, b) for a, b in zip(projections(unet, context).values(), plain.values(), strict=True))


@pytest.mark.parametrize("strength", [1.0, 0.25])
def test_custom_diffusion_rows(unet, concept, strength):
    c_prime, c_class, _ = concept
    context = context_of(concept, strength)
    weights = {key: Replacement(w) for key, w in random_cd_weights(unet).items()}
    plain = projections(unet, context)
    with KVInjector(unet, [marked(concept, strength)], [weights]):
        hooked = projections(unet, context)
    for key, out in hooked.items():
        base = attn2_modules(unet)[key].weight
        want = torch.lerp(F.linear(c_class, base), F.linear(c_prime, weights[key].weight), strength)
        torch.testing.assert_close(out[0, list(POSITIONS)], want, rtol=1e-5, atol=1e-5)
        others = other_rows(out.shape)
        assert torch.equal(out[others], plain[key][others])


def test_emphasis_scales_the_concept_keys(unet, concept):
    """A chunk whose concept rows emphasis scaled is its own marked chunk; its keys scale with it (K is linear)."""
    c_prime, _, chunk = concept
    weights = {key: Replacement(w) for key, w in random_cd_weights(unet).items()}
    scaled = marked(concept, 1.0).rows.clone()
    scaled[list(POSITIONS)] *= 1.5
    emphasised = MarkedChunk(scaled, (ConceptRows(0, POSITIONS, c_prime * 1.5, 1.0),))
    context = torch.stack([torch.cat([scaled, chunk]), torch.cat([chunk, chunk]), torch.cat([chunk, chunk])])
    with KVInjector(unet, [emphasised], [weights]):
        hooked = projections(unet, context)
    for key, out in hooked.items():
        torch.testing.assert_close(out[0, 2:4], 1.5 * F.linear(c_prime, weights[key].weight), rtol=1e-5, atol=1e-5)


def test_tiled_and_repeated_chunks_are_all_rewritten(unet, concept):
    """A chunk repeated at t and t + 77 (Forge's LCM tiling, or the same prompt in two batch items)."""
    kv = lora(unet)
    chunk = marked(concept, 1.0)
    context = torch.stack([torch.cat([chunk.rows, chunk.rows]), torch.cat([concept[2], chunk.rows]), context_of(concept, 1)[2]])
    plain = projections(unet, context)
    with KVInjector(unet, [chunk], [kv]):
        hooked = projections(unet, context)
    for key, out in hooked.items():
        changed = (out != plain[key]).any(-1).nonzero().tolist()
        assert changed == [[0, 2], [0, 3], [0, 79], [0, 80], [1, 79], [1, 80]]


def test_lora_full_scope_restores_base_keys_for_other_tokens(unet, concept):
    c_prime, c_class, _ = concept
    context = context_of(concept, 0.5)
    kv = lora(unet)
    base = projections(unet, context)
    patched = copy.deepcopy(unet)  # the WebUI's Lora extension: W + ΔW in place, for every token
    for key, module in attn2_modules(patched).items():
        with torch.no_grad():
            module.weight += kv[key].scale * kv[key].up @ kv[key].down
    with KVInjector(patched, [marked(concept, 0.5)], [kv], global_lora=list(kv.items())):
        hooked = projections(patched, context)
    for key, out in hooked.items():
        weight = attn2_modules(unet)[key].weight
        want = torch.lerp(F.linear(c_class, weight), F.linear(c_prime, weight) + kv[key].delta(c_prime), 0.5)
        torch.testing.assert_close(out[0, 2:4], want, rtol=1e-4, atol=1e-5)
        others = other_rows(out.shape)
        torch.testing.assert_close(out[others], base[key][others], rtol=1e-4, atol=1e-5)


def test_hooks_of_a_finished_job_do_nothing_and_leave(unet, concept):
    context = context_of(concept, 1.0)
    plain = projections(unet, context)
    current = {"job": True}
    injector = KVInjector(unet, [marked(concept, 1.0)], [lora(unet)], is_current=lambda: current["job"])
    current["job"] = False
    hooked = projections(unet, context)
    assert not injector.installed
    assert all(torch.equal(hooked[key], plain[key]) for key in plain)
    assert all(not module._forward_hooks for module in attn2_modules(unet).values())


def test_chunks_that_never_arrive_are_reported(unet, concept):
    with KVInjector(unet, [marked(concept, 0.7)], [lora(unet)]) as injector:
        projections(unet, context_of(concept, 1.0))
        assert len(injector.unmatched_layers()) == 32


def test_rewriting_reads_nothing_back_from_the_device(unet, concept):
    """Per layer call: no value read back, no data-dependent shape (each would be a host-device sync on a GPU)."""
    context = context_of(concept, 1.0)
    rewriter = KVRewriter([marked(concept, 1.0)], [lora(unet)])
    modules = attn2_modules(unet)
    for step in range(2):
        step_context = context.clone()
        with torch.no_grad(), SyncCounter() as counter:
            for key, module in modules.items():
                rewriter.rewrite(key, step_context, module(step_context))
        assert counter.count == 0, step
    with SyncCounter() as counter:
        assert rewriter.unmatched_layers() == []  # read back once, after the pass
    assert counter.count == 32


def test_weights_for_another_model_are_refused(unet):
    wide = {("input_blocks.1.1.transformer_blocks.0.attn2", "k"): Replacement(torch.zeros(32, 768))}
    with pytest.raises(
        ConceptError, match=r"made for another model: input_blocks.1.1.transformer_blocks.0.attn2.to_k is \(32, 768\)"
    ):
        check_fits("delta", wide, attn2_modules(unet))
    with pytest.raises(ConceptError, match="no layer output_blocks.12.1"):
        check_fits(
            "delta", {("output_blocks.12.1.transformer_blocks.0.attn2", "k"): Replacement(torch.zeros(1, 1))}, attn2_modules(unet)
        )


def test_text_encoder_lora_is_functional(text_model, encoder):
    from weight_files import random_text_factors

    factors = {name.replace(".", "_"): LowRank(d, u, 0.5) for name, (d, u, _) in random_text_factors(text_model).items()}
    tokens, weights = [49406, 320, 2368] + [49407] * 74, [1.0] * 77
    before = weights_digest(text_model)
    plain = encoder.encode_chunk(tokens, weights, [])
    with text_lora(text_model, factors):
        customized = encoder.encode_chunk(tokens, weights, [])
    merged = copy.deepcopy(text_model)
    for name, module in merged.named_modules():
        key = name.replace(".", "_")
        if key in factors:
            with torch.no_grad():
                module.weight += factors[key].scale * factors[key].up @ factors[key].down
    from hf_clip import HFClipEncoder

    reference = HFClipEncoder(merged, encoder.tokenizer).encode_chunk(tokens, weights, [])
    torch.testing.assert_close(customized, reference, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(customized, plain)
    assert torch.equal(encoder.encode_chunk(tokens, weights, []), plain) and weights_digest(text_model) == before
    with pytest.raises(ConceptError, match="does not have"):
        with text_lora(text_model, {"encoder_layers_99_mlp_fc1": factors[next(iter(factors))]}):
            pass


def test_a_scope_without_concept_rows_still_takes_the_lora_out(unet, concept):
    """'full' scope while the prompt carries no concept: every row gets its base keys back."""
    context = context_of(concept, 1.0)
    kv = lora(unet)
    base = projections(unet, context)
    patched = copy.deepcopy(unet)
    for key, module in attn2_modules(patched).items():
        with torch.no_grad():
            module.weight += kv[key].scale * kv[key].up @ kv[key].down
    with KVInjector(patched, [], [kv], global_lora=list(kv.items())):
        hooked = projections(patched, context)
    for key, out in hooked.items():
        torch.testing.assert_close(out, base[key], rtol=1e-4, atol=1e-5)


def test_a_failing_rewrite_removes_the_hooks_and_says_why(unet, concept, monkeypatch):
    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(KVRewriter, "rewrite", broken)
    context = context_of(concept, 1.0)
    plain = projections(unet, context)
    injector = KVInjector(unet, [marked(concept, 1.0)], [lora(unet)])
    seen = projections(unet, context)
    assert injector.error == "RuntimeError: boom" and not injector.installed
    assert all(torch.equal(seen[key], plain[key]) for key in plain)
