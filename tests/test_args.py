import pytest

from alignit import args
from alignit.concepts import Concept, ConceptError, Options


def test_positional_ui_order():
    enabled, options = args.parse_args([True, 0.8, 0.1, 0.9, "*", "<sks>", "cat", "my-cat", "", "", "", "lisa", "woman", None])
    assert enabled
    assert options == Options(0.8, 0.1, 0.9, "*", (Concept("<sks>", "cat", "my-cat"), Concept("lisa", "woman", "")))


def test_dict_form_and_defaults():
    enabled, options = args.parse_args([{"enabled": True, "concepts": [["<sks>", "cat"], {"trigger": "x", "class_word": "dog"}]}])
    assert enabled and options.strength == 1.0 and options.placeholder == "*"
    assert options.concepts == (Concept("<sks>", "cat", ""), Concept("x", "dog", ""))
    assert args.parse_args([]) == (False, Options())


def test_bad_numbers_are_a_concept_error():
    with pytest.raises(ConceptError):
        args.parse_args([True, "strong"])


def test_infotext_round_trip():
    options = Options(0.7, 0.2, 0.8, "~", (Concept("<sks>", "cat", "my, cat"), Concept("lisa", "woman")))
    params = args.to_infotext(options)
    assert params == {
        "AlignIT": '[["<sks>", "cat", "my, cat"], ["lisa", "woman", ""]]',
        "AlignIT strength": "0.7",
        "AlignIT steps": "0.2-0.8",
        "AlignIT placeholder": "~",
    }
    assert args.parse_args(args.from_infotext(params)) == (True, options)
    assert args.from_infotext({})[0] is False


def test_overrides_for_xyz():
    options = Options(concepts=(Concept("<sks>", "cat"), Concept("x", "dog")))
    enabled, changed = args.with_overrides(True, options, {"enabled": False, "strength": "0.5", "class_word": "kitten"})
    assert not enabled and changed.strength == 0.5
    assert changed.concepts == (Concept("<sks>", "kitten"), Concept("x", "dog"))


@pytest.mark.parametrize(
    ("concept", "message"),
    [
        (Concept("", "cat"), "no trigger"),
        (Concept("<sks>", " "), "class word is empty"),
        (Concept("<sks>", "(cat)"), "plain words"),
        (Concept("<sks>", "cat AND dog"), "plain words"),
    ],
)
def test_concept_validation(concept, message):
    with pytest.raises(ConceptError, match=message):
        concept.validated()
