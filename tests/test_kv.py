"""K/V injection on the real ldm UNet: concept rows get the customized keys/values, every other row keeps W·c."""

import copy

import pytest
import torch
import torch.nn.functional as F
from ldm_parts import tiny_sd15_unet, weights_digest
from weight_files import random_cd_weights, random_factors

from alignit.errors import ConceptError
from alignit.hosts.webui.ldm import KVInjector, attn2_modules
from alignit.kv import ConceptKV, LowRank, Replacement, check_fits
from alignit.text_lora import text_lora

CONCEPT_AT = [(0, 2), (0, 3), (1, 5), (1, 6)]  # (batch row, token) of the concept's two rows in two cond items


@pytest.fixture(scope="module")
def unet():
    return tiny_sd15_unet()


@pytest.fixture(scope="module")
def concept_rows():
    return torch.randn(2, 32, generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def context(concept_rows):
    """Two cond items carrying the concept rows at different places, and an uncond item without them."""
    context = torch.randn(3, 77, 32, generator=torch.Generator().manual_seed(5))
    context[0, 2:4] = concept_rows
    context[1, 5:7] = concept_rows
    return context


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


def is_concept(b, t):
    return (b, t) in CONCEPT_AT


def test_lora_kv_scope(unet, context, concept_rows):
    before = weights_digest(unet)
    plain = projections(unet, context)
    kv = lora(unet, 0.8)
    with KVInjector(unet, [ConceptKV(concept_rows, kv)]) as injector:
        hooked = projections(unet, context)
    assert not injector.installed and not injector.unmatched_layers()
    assert len(hooked) == 32  # 16 layers x (to_k, to_v)
    for key, out in hooked.items():
        weight = attn2_modules(unet)[key].weight
        want = F.linear(concept_rows, weight) + kv[key].delta(concept_rows)
        for b, t in CONCEPT_AT:
            torch.testing.assert_close(out[b, t], want[(t - 2) % 2 if b == 0 else t - 5], rtol=1e-5, atol=1e-6)
        others = torch.tensor([[not is_concept(b, t) for t in range(77)] for b in range(3)])
        assert torch.equal(out[others], plain[key][others])  # every other row, uncond included: W·c, bit for bit
    assert weights_digest(unet) == before
    assert all(torch.equal(a, b) for a, b in zip(projections(unet, context).values(), plain.values(), strict=True))


def test_custom_diffusion_rows_are_exact(unet, context, concept_rows):
    weights = {key: Replacement(w) for key, w in random_cd_weights(unet).items()}
    plain = projections(unet, context)
    with KVInjector(unet, [ConceptKV(concept_rows, weights)]):
        hooked = projections(unet, context)
    for key, out in hooked.items():
        want = F.linear(concept_rows, weights[key].weight)
        assert torch.equal(out[0, 2:4], want) and torch.equal(out[1, 5:7], want)
        assert torch.equal(out[2], plain[key][2])


def test_emphasis_scales_the_concept_keys(unet, context, concept_rows):
    """A row scaled by emphasis is still recognised, and its keys scale with it (K is linear in c)."""
    weights = {key: Replacement(w) for key, w in random_cd_weights(unet).items()}
    scaled = context.clone()
    scaled[0, 2:4] *= 1.5
    with KVInjector(unet, [ConceptKV(torch.cat([concept_rows, concept_rows * 1.5]), weights)]):
        hooked = projections(unet, scaled)
    for key, out in hooked.items():
        torch.testing.assert_close(out[0, 2:4], 1.5 * F.linear(concept_rows, weights[key].weight), rtol=1e-5, atol=1e-5)


def test_lora_full_scope_restores_base_keys_for_other_tokens(unet, context, concept_rows):
    kv = lora(unet)
    base = projections(unet, context)
    patched = copy.deepcopy(unet)  # the WebUI's Lora extension: W + ΔW in place, for every token
    for key, module in attn2_modules(patched).items():
        with torch.no_grad():
            module.weight += kv[key].scale * kv[key].up @ kv[key].down
    with KVInjector(patched, [ConceptKV(concept_rows, {})], global_lora=list(kv.items())):
        hooked = projections(patched, context)
    for key, out in hooked.items():
        weight = attn2_modules(unet)[key].weight
        torch.testing.assert_close(
            out[0, 2:4], F.linear(concept_rows, weight) + kv[key].delta(concept_rows), rtol=1e-4, atol=1e-5
        )
        others = torch.tensor([[not is_concept(b, t) for t in range(77)] for b in range(3)])
        torch.testing.assert_close(out[others], base[key][others], rtol=1e-4, atol=1e-5)


def test_hooks_of_a_finished_job_do_nothing_and_leave(unet, context, concept_rows):
    plain = projections(unet, context)
    current = {"job": True}
    injector = KVInjector(unet, [ConceptKV(concept_rows, lora(unet))], is_current=lambda: current["job"])
    current["job"] = False
    hooked = projections(unet, context)
    assert not injector.installed
    assert all(torch.equal(hooked[key], plain[key]) for key in plain)
    assert all(not module._forward_hooks for module in attn2_modules(unet).values())


def test_rows_that_never_arrive_are_reported(unet, context, concept_rows):
    with KVInjector(unet, [ConceptKV(concept_rows + 1.0, lora(unet))]) as injector:
        projections(unet, context)
        assert len(injector.unmatched_layers()) == 32


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


def test_a_scope_without_concept_rows_still_takes_the_lora_out(unet, context):
    """'full' scope while the prompt carries no concept: every row gets its base keys back."""
    kv = lora(unet)
    base = projections(unet, context)
    patched = copy.deepcopy(unet)
    for key, module in attn2_modules(patched).items():
        with torch.no_grad():
            module.weight += kv[key].scale * kv[key].up @ kv[key].down
    with KVInjector(patched, [], global_lora=list(kv.items())):
        hooked = projections(patched, context)
    for key, out in hooked.items():
        torch.testing.assert_close(out, base[key], rtol=1e-4, atol=1e-5)


def test_a_failing_rewrite_removes_the_hooks_and_says_why(unet, context, concept_rows, monkeypatch):
    from alignit.kv import KVRewriter

    def broken(self, *args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(KVRewriter, "rewrite", broken)
    plain = projections(unet, context)
    injector = KVInjector(unet, [ConceptKV(concept_rows, lora(unet))])
    seen = projections(unet, context)
    assert injector.error == "RuntimeError: boom" and not injector.installed
    assert all(torch.equal(seen[key], plain[key]) for key in plain)
