import pytest

from alignit.concepts import Concept, Options, SourceKind, SourceSpec, parse_source
from alignit.errors import ConceptError
from alignit.hosts.webui import args
from alignit.infotext import to_infotext


def test_positional_ui_order():
    row1, row2, row3 = ["<sks>", "cat", "my-cat", 0.8], ["", "", "", 1.0], ["lisa", "woman", None, None]
    enabled, options = args.parse_args([True, 0.1, 0.9, "*", "kv", *row1, *row2, *row3])
    assert enabled
    assert options == Options(0.1, 0.9, "*", (Concept("<sks>", "cat", "my-cat", 0.8), Concept("lisa", "woman", "")))


def test_dict_form_and_defaults():
    given = {"enabled": True, "concepts": [["<sks>", "cat"], {"trigger": "x", "class_word": "dog", "strength": 0.5}]}
    enabled, options = args.parse_args([given])
    assert enabled and options.placeholder == "*" and (options.step_start, options.step_end) == (0.0, 1.0)
    assert options.concepts == (Concept("<sks>", "cat", "", 1.0), Concept("x", "dog", "", 0.5))
    assert args.parse_args([]) == (False, Options())
    ui_defaults = [False, 0.0, 1.0, "*", "kv"] + ["", "", "", 1.0] * args.ROWS
    assert args.parse_args([given, *ui_defaults[1:]]) == (enabled, options)  # as the API passes it


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ([True, "early"], "'step_start' must be a number"),
        (["garbage"], "'enabled' must be true or false, not 'garbage'"),
        ([{"enabled": True, "concepts": ["abc"]}], "concept 1 must be a list"),
        ([{"enabled": True, "concepts": "abc"}], "'concepts' must be a list"),
        ([{"enabled": True, "concepts": [["<sks>", 5]]}], "must be text"),
        ([{"enabled": True, "concepts": [{"trigger": "x", "klass": "y"}]}], "unknown field"),
        ([{"enabled": True, "steps": 3}], "unknown AlignIT argument"),
        ([True, 0, 1, "*", "kv", *["x"] * 20], "at most 20 arguments"),
        ([True, 0, 1, None, ["kv"]], "'lora_scope' must be text"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(arguments, message):
    with pytest.raises(ConceptError, match=message) as caught:
        args.parse_args(arguments)
    assert "\n" not in str(caught.value)


def test_infotext_is_readable_per_concept_and_round_trips():
    options = Options(0.2, 0.8, "~", (Concept("<sks>", "cat", "my, cat", 0.7), Concept("lisa", "woman")), "full")
    params = to_infotext(options, options.concepts)
    assert params == {
        "AlignIT 1": "<sks> → cat, source: my, cat, strength: 0.7",
        "AlignIT 2": "lisa → woman",
        "AlignIT steps": "0.2-0.8",
        "AlignIT placeholder": "~",
        "AlignIT LoRA scope": "full",
    }
    assert args.parse_args(args.from_infotext(params)) == (True, options)
    assert args.from_infotext({})[0] is False
    assert to_infotext(Options(concepts=options.concepts), options.concepts[1:]) == {"AlignIT 1": "lisa → woman"}


def test_infotext_of_version_0_1_still_pastes():
    params = {"AlignIT": '[["<sks>", "cat", "my-cat", 0.8], ["lisa", "woman", ""]]', "AlignIT steps": "0-0.6"}
    enabled, options = args.parse_args(args.from_infotext(params))
    assert enabled and options == Options(0.0, 0.6, "*", (Concept("<sks>", "cat", "my-cat", 0.8), Concept("lisa", "woman")))


@pytest.mark.parametrize(
    "params",
    [
        {"AlignIT": "{…}"},
        {"AlignIT": "[5]"},
        {"AlignIT": '{"a": 1}'},
        {"AlignIT 1": "<sks> → cat", "AlignIT steps": "abc"},
        {"AlignIT 1": "no arrow here"},
        {"AlignIT 1": "<sks> → cat, strength: lots"},
        {"AlignIT 1": "<sks> → cat", "AlignIT steps": "0.9-0.1"},
    ],
)
def test_malformed_infotext_is_refused_in_one_line(params):
    with pytest.raises(ConceptError) as caught:
        args.parse_args(args.from_infotext(params))
    assert "\n" not in str(caught.value)


def test_overrides_for_xyz():
    options = Options(concepts=(Concept("<sks>", "cat"), Concept("x", "dog")))
    enabled, changed = args.with_overrides(True, options, {"enabled": False, "strength": "0.5", "class_word": "kitten"})
    assert not enabled
    assert changed.concepts == (Concept("<sks>", "kitten", "", 0.5), Concept("x", "dog", "", 0.5))


@pytest.mark.parametrize(
    ("concept", "message"),
    [
        (Concept("", "cat"), "no trigger"),
        (Concept("<sks>", " "), "class word is empty"),
        (Concept("<sks>", "(cat)"), "plain words"),
        (Concept("<sks>", "cat AND dog"), "plain words"),
        (Concept("<sks>", "cat", "", 3.0), "strength"),
    ],
)
def test_concept_validation(concept, message):
    with pytest.raises(ConceptError, match=message):
        concept.validated()


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("", SourceSpec(SourceKind.EMBEDDING, "<sks>")),
        ("my-cat", SourceSpec(SourceKind.EMBEDDING, "my-cat")),
        ("lora:cat_v2", SourceSpec(SourceKind.LORA, "cat_v2", 1.0)),
        ("LoRA:cat_v2:0.6", SourceSpec(SourceKind.LORA, "cat_v2", 0.6)),
        ("lora:odd:name", SourceSpec(SourceKind.LORA, "odd:name", 1.0)),
        ("cd:cat delta", SourceSpec(SourceKind.CUSTOM_DIFFUSION, "cat delta")),
    ],
)
def test_source_specs(source, expected):
    assert parse_source(Concept("<sks>", "cat", source)) == expected


def test_a_paste_reads_the_fields_once_and_a_bad_one_keeps_the_fields(caplog):
    good = {"Prompt": "a <sks>", "AlignIT 1": "<sks> → cat, strength: 0.5", "AlignIT steps": "0-0.6"}
    args.paste(good)
    values = [good[args.PASTE_KEY.format(i)] for i in range(args.ARG_COUNT)]
    assert values[:9] == [True, 0.0, 0.6, "*", "kv", "<sks>", "cat", "", 0.5]
    bad = {"Prompt": "a <sks>", "AlignIT": "[5]"}
    args.paste(bad)
    assert not any(key.startswith("AlignIT paste") for key in bad)  # no value: the WebUI leaves every field as it is
    assert caplog.messages == [
        "AlignIT: the pasted infotext's AlignIT fields are not applied: "
        "'AlignIT: [5]' is not a list of [trigger, class word, source, strength]"
    ]
    plain = {"Prompt": "a cat"}
    args.paste(plain)
    assert plain[args.PASTE_KEY.format(0)] is False  # an infotext without AlignIT turns it off


def test_maps_arguments_positional_dict_and_infotext():
    rows = ["<sks>", "cat", "", 1.0] + ["", "", "", 1.0] * (args.ROWS - 1)
    positional = [True, 0.0, 1.0, "*", "kv", *rows, True, True, " cat, racket "]
    assert args.parse_maps(positional) == args.MapSettings(True, True, "cat, racket")
    assert args.parse_maps(positional[:-3]) == args.MapSettings()  # an older caller without the maps' arguments
    assert args.parse_maps([{"enabled": True, "maps": "true"}]) == args.MapSettings(True, False, "")
    assert args.parse_args([{"enabled": True, "maps": True, "maps_words": "x"}])[0] is True
    with pytest.raises(ConceptError, match="'maps' must be true or false"):
        args.parse_maps([{"maps": "yes"}])
    with pytest.raises(ConceptError, match="'maps_words' must be text"):
        args.parse_maps([{"maps": True, "maps_words": ["cat"]}])
    assert args.maps_infotext(args.MapSettings()) == {}
    assert args.maps_infotext(args.MapSettings(True)) == {"AlignIT maps": "on"}
    assert args.maps_infotext(args.MapSettings(True, True, "cat, racket")) == {"AlignIT maps": "compare, words: cat, racket"}
    pasted = args.from_infotext({"AlignIT 1": "<sks> → cat", "AlignIT maps": "compare, words: cat, racket"})
    assert pasted[-3:] == [True, True, "cat, racket"] and args.parse_maps(pasted) == args.MapSettings(True, True, "cat, racket")
    assert args.from_infotext({"AlignIT maps": "on"})[-3:] == [True, False, ""]
    assert args.from_infotext({})[-3:] == [False, False, ""]
    with pytest.raises(ConceptError, match="is not 'on' or 'compare'"):
        args.from_infotext({"AlignIT maps": "sometimes"})
