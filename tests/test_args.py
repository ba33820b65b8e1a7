import pytest

from alignit.concepts import Concept, Options, SourceKind, SourceSpec, parse_source
from alignit.errors import ConceptError
from alignit.hosts.webui import args


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


def test_bad_numbers_are_a_concept_error():
    with pytest.raises(ConceptError):
        args.parse_args([True, "early"])


def test_infotext_round_trip():
    options = Options(0.2, 0.8, "~", (Concept("<sks>", "cat", "my, cat", 0.7), Concept("lisa", "woman")), "full")
    params = args.to_infotext(options)
    assert params == {
        "AlignIT": '[["<sks>", "cat", "my, cat", 0.7], ["lisa", "woman", ""]]',
        "AlignIT steps": "0.2-0.8",
        "AlignIT placeholder": "~",
        "AlignIT LoRA scope": "full",
    }
    assert args.parse_args(args.from_infotext(params)) == (True, options)
    assert args.from_infotext({})[0] is False


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
