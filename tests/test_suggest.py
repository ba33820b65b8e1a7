"""Class-word suggestions through both WebUI glues (A1111 and Forge contracts): concepts built so that one candidate is
their class word by construction rank it first, and the scores equal the formula computed by hand with the reference
encoder and the UNet's own weights."""

from pathlib import Path
from types import SimpleNamespace

import forge_flow
import networks
import pytest
import torch
import torch.nn.functional as F
import webui_flow
from hf_clip import HFClipEncoder
from ldm_parts import tiny_sd15_unet
from modules import sd_hijack, sd_models, shared
from safetensors.torch import save_file
from weight_files import cd_state, lora_state

from alignit.errors import ConceptError
from alignit.hosts.webui import suggestions
from alignit.kv_hooks import attn2_modules
from alignit.suggest import PREFIX, candidate_words, read_words

PLACEHOLDER = 265  # "*"


@pytest.fixture(params=["a1111", "forge"])
def host(request, text_model, tokenizer, tmp_path, monkeypatch):
    """A loaded SD1.5-layout model in either WebUI (tiny UNet, small CLIP with the real vocabulary), and folders for
    LoRAs and Custom Diffusion deltas."""
    unet = tiny_sd15_unet()
    if request.param == "a1111":
        model = webui_flow.FakeModel(text_model, tokenizer, unet)
        database = sd_hijack.EmbeddingDatabase()
        monkeypatch.setattr(sd_hijack.model_hijack, "embedding_db", database)
        glue = webui_flow.HOST
    else:
        model = forge_flow.FakeForgeModel({"clip_l": text_model}, tokenizer, unet)
        database = model.text_processing_engine.embeddings
        glue = forge_flow.HOST
    monkeypatch.setattr(shared, "sd_model", model)
    monkeypatch.setattr(networks, "available_network_aliases", {})
    cd_dir = tmp_path / "cd"
    cd_dir.mkdir()
    monkeypatch.setattr(shared.opts, "alignit_custom_diffusion_dir", str(cd_dir), raising=False)
    monkeypatch.setattr(shared.opts, suggestions.WORDS_OPTION, "", raising=False)
    suggestions.forget_model()
    reference = HFClipEncoder(text_model, tokenizer)
    yield SimpleNamespace(
        glue=glue, unet=unet, database=database, tmp=tmp_path, cd=cd_dir, reference=reference, kind=request.param
    )
    suggestions.forget_model()


def dummy(host, ids, fixes=()):
    """p' of "a photo of a x" by hand: BOS, four placeholders, x, EOS to the end."""
    tokens = [49406] + [PLACEHOLDER] * PREFIX + list(ids)
    return tokens + [49407] * (77 - len(tokens))


_rows: dict = {}


def reference_row(host, ids, fixes=(), cached=True):
    """r̄(x) from the reference encoder: the mean of x's rows (a word's kept: the session's text model is one)."""
    if cached and not fixes and tuple(ids) in _rows:
        return _rows[tuple(ids)]
    with torch.no_grad():
        rows = host.reference.encode_chunk(dummy(host, ids), [1.0] * 77, list(fixes))
    row = rows[PREFIX + 1 : PREFIX + 1 + len(ids)].mean(0)
    if not fixes:
        _rows[tuple(ids)] = row
    return row


def word_ids(host, word):
    return host.reference.tokenize([word])[0]


def hand_scores(host, concept_keys, words):
    """The formula by hand: 1/L Σ_l cos(K_l^c − μ_l, K_l · r̄(w) − μ_l), K_l the layer's weight, μ_l the mean of
    K_l · r̄(v) over every candidate v, each r̄ from its own p' through the reference encoder."""
    layers = {layer: module.weight.detach() for (layer, proj), module in attn2_modules(host.unet).items() if proj == "k"}
    rows = {word: reference_row(host, word_ids(host, word)) for word in suggestions.words()}
    mean = {layer: torch.stack([weight @ row for row in rows.values()]).mean(0) for layer, weight in layers.items()}
    out = {}
    for word in words:
        cosines = [
            F.cosine_similarity(concept_keys[layer] - mean[layer], weight @ rows[word] - mean[layer], dim=0)
            for layer, weight in layers.items()
        ]
        out[word] = float(sum(cosines) / len(layers))
    return out


def ask(host, trigger, source="", class_word="", top=5):
    status, content = suggestions.respond(
        host.glue, f'{{"trigger": "{trigger}", "source": "{source}", "class_word": "{class_word}", "top": {top}}}'.encode()
    )
    assert status == 200, content
    return content


def token_row(text_model, word_id):
    return text_model.get_input_embeddings().wrapped.weight[word_id].detach().clone()


def test_an_embedding_near_dog_ranks_dog_first(host, text_model, tokenizer):
    dog = token_row(text_model, word_ids(host, "dog")[0])
    vector = dog + 0.02 * dog.norm() / dog.numel() ** 0.5 * torch.randn(dog.shape, generator=torch.Generator().manual_seed(4))
    host.database.register_embedding(sd_hijack.Embedding(vector[None], "mypet"), word_ids(host, "mypet"))
    found = ask(host, "mypet")
    assert found[0]["word"] == "dog", found
    assert len(found) == 5 and [item["score"] for item in found] == sorted((item["score"] for item in found), reverse=True)
    # the scores are the formula, computed by hand
    row = reference_row(host, [0], [(PREFIX, vector[None])])
    keys = {layer: module.weight.detach() @ row for (layer, proj), module in attn2_modules(host.unet).items() if proj == "k"}
    expected = hand_scores(host, keys, [item["word"] for item in found])
    for item in found:
        assert item["score"] == pytest.approx(expected[item["word"]], abs=1e-4)


def final_layer_parts(host, text_model, ids):
    """The input of the last layer's ``mlp.fc2`` and the residual stream after it (before the final LayerNorm), at
    the rows of x in its p'."""
    seen = {}
    layer = text_model.encoder.layers[-1]
    handles = [
        layer.mlp.fc2.register_forward_hook(lambda m, i, o: seen.__setitem__("fc2_in", i[0][0])),
        layer.register_forward_hook(lambda m, i, o: seen.__setitem__("out", (o[0] if isinstance(o, tuple) else o)[0])),
    ]
    try:
        reference_row(host, ids, cached=False)
    finally:
        for handle in handles:
            handle.remove()
    where = slice(PREFIX + 1, PREFIX + 1 + len(ids))
    return seen["fc2_in"][where], seen["out"][where]


def test_a_lora_whose_text_part_moves_its_trigger_to_cat_ranks_cat_first(host, text_model):
    """A rank-1 text-encoder LoRA on the last layer's ``mlp.fc2``: ``ΔW·a = h_cat − h_trigger`` at the trigger's row,
    so the trigger's final row in p' is cat's."""
    trigger_in, trigger_out = final_layer_parts(host, text_model, word_ids(host, "ohwx"))
    _, cat_out = final_layer_parts(host, text_model, word_ids(host, "cat"))
    a, d = trigger_in[0], cat_out[0] - trigger_out[0]
    down, up = (a / a.dot(a))[None], d[:, None]
    path = host.tmp / "to_cat.safetensors"
    save_file(
        lora_state({}, {f"encoder.layers.{len(text_model.encoder.layers) - 1}.mlp.fc2": (down, up, torch.tensor(1.0))}), str(path)
    )
    networks.available_network_aliases["to_cat"] = SimpleNamespace(filename=str(path))
    found = ask(host, "ohwx", "lora:to_cat")
    assert found[0]["word"] == "cat" and found[0]["score"] == pytest.approx(1.0, abs=1e-4), found
    save_file(lora_state({}, {"encoder.layers.0.mlp.fc2": (down * 0, up, torch.tensor(1.0))}), str(host.tmp / "none.safetensors"))
    networks.available_network_aliases["none"] = SimpleNamespace(filename=str(host.tmp / "none.safetensors"))
    assert ask(host, "ohwx", "lora:none")[0]["score"] < 0.9  # the trigger's own rows are not cat's


def key_towards(host, row_from, row_to):
    """Per layer, a rank-1 change of the key weight taking ``row_from`` to the key ``row_to`` has: ``(up, down)``
    with ``(W + up·down)·row_from = W·row_to``."""
    out = {}
    for (layer, proj), module in attn2_modules(host.unet).items():
        if proj == "k":
            weight = module.weight.detach()
            out[layer] = ((weight @ row_to - weight @ row_from)[:, None], (row_from / row_from.dot(row_from))[None])
    return out


def test_a_lora_whose_unet_keys_move_its_trigger_to_cat_ranks_cat_first(host):
    """No text part: only the UNet's ΔK takes the trigger's keys to cat's, so this ranks cat first only if the
    concept's keys include its ΔW."""
    towards = key_towards(host, reference_row(host, word_ids(host, "ohwx")), reference_row(host, word_ids(host, "cat")))
    factors = {(layer, "k"): (down, up, torch.tensor(1.0)) for layer, (up, down) in towards.items()}
    path = host.tmp / "keys_to_cat.safetensors"
    save_file(lora_state(factors, scheme="kohya_ldm"), str(path))
    networks.available_network_aliases["keys_to_cat"] = SimpleNamespace(filename=str(path))
    found = ask(host, "ohwx", "lora:keys_to_cat:0.5", top=100)
    assert found[0]["word"] != "cat"  # at half strength the keys are halfway: not cat's
    found = ask(host, "ohwx", "lora:keys_to_cat", top=100)
    assert found[0]["word"] == "cat" and found[0]["score"] == pytest.approx(1.0, abs=1e-4), found[:5]
    row = reference_row(host, word_ids(host, "ohwx"))
    keys = {
        layer: module.weight.detach() @ row + towards[layer][0] @ (towards[layer][1] @ row)
        for (layer, proj), module in attn2_modules(host.unet).items()
        if proj == "k"
    }
    expected = hand_scores(host, keys, [item["word"] for item in found[:10]])
    for item in found[:10]:
        assert item["score"] == pytest.approx(expected[item["word"]], abs=1e-4)


def test_a_custom_diffusion_delta_whose_keys_move_its_token_to_cat_ranks_cat_first(host):
    modifier = torch.randn(1, 32, generator=torch.Generator().manual_seed(11))
    concept = reference_row(host, [0], [(PREFIX, modifier)])
    towards = key_towards(host, concept, reference_row(host, word_ids(host, "cat")))
    weights = {}
    for (layer, proj), module in attn2_modules(host.unet).items():
        weight = module.weight.detach()
        weights[(layer, proj)] = weight + towards[layer][0] @ towards[layer][1] if proj == "k" else weight.clone()
    torch.save(cd_state(weights, modifier, "delta_bin"), host.cd / "towards_cat.bin")
    found = ask(host, "<new1>", "cd:towards_cat", top=100)
    assert found[0]["word"] == "cat" and found[0]["score"] == pytest.approx(1.0, abs=1e-4), found[:5]
    keys = {layer: weights[(layer, "k")] @ concept for layer in towards}
    expected = hand_scores(host, keys, [item["word"] for item in found[:10]])
    for item in found[:10]:
        assert item["score"] == pytest.approx(expected[item["word"]], abs=1e-4)


def test_the_rows_class_word_and_the_settings_list_are_ranked_too(host, text_model):
    dog = token_row(text_model, word_ids(host, "dog")[0])
    host.database.register_embedding(sd_hijack.Embedding(dog[None], "mypet"), word_ids(host, "mypet"))
    extra = host.tmp / "words.txt"
    extra.write_text("# mine\nhound  dog\nDOG\n<bad>\n\n")
    shared.opts.alignit_class_words_file = str(extra)
    words = suggestions.words("corgi")
    assert words[-2:] == ["hound dog", "corgi"] and words.count("dog") == 1 and "<bad>" not in words
    found = suggestions.run(host.glue, suggestions.SuggestRequest("mypet", "corgi", top=len(words)))
    assert {item.word for item in found} == set(words) and found[0].word == "dog"
    shared.opts.alignit_class_words_file = str(host.tmp / "missing.txt")
    status, content = suggestions.respond(host.glue, b'{"trigger": "mypet"}')
    assert status == 400 and content["detail"].startswith("the class-word list ") and "\n" not in content["detail"]


def test_the_candidates_keys_are_computed_once_per_model(host, text_model, monkeypatch):
    host.database.register_embedding(sd_hijack.Embedding(torch.randn(2, 32), "mypet"), word_ids(host, "mypet"))
    calls = []
    real = host.glue.encoder

    def counting():
        encoder = real()
        batches = encoder.encode_chunks
        encoder.encode_chunks = lambda *a: (calls.append(len(a[0])), batches(*a))[1]
        return encoder

    monkeypatch.setattr(host.glue, "encoder", counting)
    ask(host, "mypet")
    first = sum(calls)
    assert first == len(candidate_words()) + 1  # every candidate once, and the concept's p'
    ask(host, "mypet", top=3)
    assert sum(calls) == first + 1  # the concept only
    suggestions.forget_model()  # on_model_loaded
    ask(host, "mypet")
    assert sum(calls) == 2 * first + 1


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        (b"{not json", 422, "the request body is not JSON"),
        (b'["<sks>"]', 422, "the request must be a JSON object"),
        (b'{"trigger": ""}', 422, "'trigger' is empty"),
        (b'{"trigger": 5}', 422, "'trigger' must be text, not 5"),
        (b'{"trigger": "<sks>", "colour": 1}', 422, "unknown field(s) colour"),
        (b'{"trigger": "<sks>", "strength": 3}', 422, "'strength' must be a number in [0, 2], not 3"),
        (b'{"trigger": "<sks>", "top": 0}', 422, "'top' must be a whole number from 1 to 100, not 0"),
        (b'{"trigger": "<sks>", "class_word": "a (cat)"}', 422, "must be plain words"),
        (b'{"trigger": "<nope>"}', 400, "no embedding named '<nope>' is loaded"),
        (b'{"trigger": "x", "source": "lora:none"}', 400, "no LoRA named 'none'"),
        (b'{"trigger": "x", "source": "cd:none"}', 400, "no Custom Diffusion delta 'none'"),
        (b'{"trigger": "mypet", "placeholder": "two words"}', 400, "it must be one"),
    ],
)
def test_bad_requests_get_one_line(host, body, status, detail):
    host.database.register_embedding(sd_hijack.Embedding(torch.randn(1, 32), "mypet"), word_ids(host, "mypet"))
    got, content = suggestions.respond(host.glue, body)
    assert (got, "\n" in content["detail"]) == (status, False)
    assert detail in content["detail"], content


def test_the_button_says_why_in_one_line(host):
    found, message = suggestions.for_row(host.glue, "<nope>", "cat", "", 1.0, "*")
    assert found == [] and "no embedding named '<nope>'" in message
    host.database.register_embedding(sd_hijack.Embedding(torch.randn(1, 32), "mypet"), word_ids(host, "mypet"))
    found, message = suggestions.for_row(host.glue, "mypet", "", "", 1.0, "*")
    assert message == "" and len(found) == 5


def test_forge_loads_its_model_first(host, monkeypatch):
    """Forge loads (and patches) its models under inference mode: Suggest does its work there too, on Forge."""
    sd_models.reloads.clear()
    modes = []
    kind = type(host.glue.encoder())
    encode = kind.encode_chunks
    monkeypatch.setattr(kind, "encode_chunks", lambda *a: modes.append(torch.is_inference_mode_enabled()) or encode(*a))
    host.database.register_embedding(sd_hijack.Embedding(torch.randn(1, 32), "mypet"), word_ids(host, "mypet"))
    ask(host, "mypet")
    assert len(sd_models.reloads) == (host.kind == "forge")
    assert modes and set(modes) == {host.kind == "forge"}


def test_word_lists():
    assert read_words("cat\n  teddy   bear # a comment\nCat\n[x]\nAND\n\n# only a comment\n") == ["cat", "teddy bear"]
    words = candidate_words()
    assert {"dog", "cat", "backpack", "action figure", "person", "watercolor", "castle"} <= set(words)
    assert 250 <= len(words) <= 400
    with pytest.raises(ConceptError, match="cannot be read"):
        candidate_words(Path("/nonexistent/words.txt"))
