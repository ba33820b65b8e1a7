"""Concepts files: CustomConcept101's dataset.json and prompt files as published, and our YAML."""

from __future__ import annotations

import json

import pytest
from evaluate_parts import write_concepts_yaml, write_references

from alignit.errors import InputError
from alignit.evaluate.inputs import load_concepts

# Two entries as customconcept101/dataset.json writes them, and prompt files in its form (a trailing blank line too).
DATASET = [
    {
        "instance_prompt": "photo of a <new1> cat",
        "class_prompt": "cat",
        "instance_data_dir": "./benchmark_dataset/pet_cat1",
        "class_data_dir": "./regularization/pet_cat",
        "prompt_filename": "prompts/cat.txt",
    },
    {
        "instance_prompt": "photo of a <new1> dice plushie",
        "class_prompt": "dice",
        "instance_data_dir": "./benchmark_dataset/plushie_dice",
        "class_data_dir": "./regularization/plushie",
        "prompt_filename": "prompts/plushie.txt",
    },
    {
        "instance_prompt": "photo of a <new1> barn",
        "class_prompt": "barn",
        "instance_data_dir": "./benchmark_dataset/scene_barn",
        "class_data_dir": "./regularization/scene_barn",
        "prompt_filename": "prompts/barn.txt",
    },
]


@pytest.fixture
def customconcept101(tmp_path):
    root = tmp_path / "customconcept101"
    (root / "prompts").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(DATASET, indent=4))
    (root / "prompts" / "cat.txt").write_text(
        "Photo of a {}.\n{} swimming in a pool.\n{} at a beach with a view of the seashore.\n\n"
    )
    (root / "prompts" / "plushie.txt").write_text("{} floating on top of water.\n{} in the jungle.\n")
    for folder in ("pet_cat1", "plushie_dice", "scene_barn"):
        write_references(root / "benchmark_dataset" / folder, 2, 3)
    (root / "benchmark_dataset" / "pet_cat1" / "notes.txt").write_text("not an image")
    (root / "benchmark_dataset" / "pet_cat1" / "upper.JPG").write_bytes((root / "benchmark_dataset/pet_cat1/01.jpg").read_bytes())
    (root / "benchmark_dataset" / "pet_cat1" / "upper.PNG").write_text("evaluate.py reads .JPG but not .PNG")
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "pet_cat1.safetensors").write_bytes(b"x")
    (sources / "plushie_dice.bin").write_bytes(b"x")
    return root, sources


def test_customconcept101_dataset_with_sources(customconcept101):
    root, sources = customconcept101
    cat, dice = load_concepts(root / "dataset.json", sources)  # scene_barn has no source file: left out
    assert (cat.name, cat.trigger, cat.class_word, cat.source) == (
        "pet_cat1",
        "<new1>",
        "cat",
        str(sources / "pet_cat1.safetensors"),
    )
    assert cat.prompts == ("Photo of a {}.", "{} swimming in a pool.", "{} at a beach with a view of the seashore.")
    assert cat.prompt(cat.prompts[1]) == "<new1> swimming in a pool."
    assert cat.text_prompt(cat.prompts[0]) == "Photo of a cat."
    assert [path.name for path in cat.reference_images()] == ["00.png", "01.jpg", "upper.JPG"]
    assert (dice.name, dice.class_word, dice.source) == ("plushie_dice", "dice", str(sources / "plushie_dice.bin"))
    assert dice.text_prompt(dice.prompts[1]) == "dice in the jungle."


def test_customconcept101_dataset_needs_sources(customconcept101, tmp_path):
    root, _ = customconcept101
    with pytest.raises(InputError, match="--sources"):
        load_concepts(root / "dataset.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no concept of the dataset file has its source file"):
        load_concepts(root / "dataset.json", tmp_path / "empty")


def test_multiconcept_file_is_refused(customconcept101):
    root, sources = customconcept101
    (root / "dataset_multiconcept.json").write_text(json.dumps([[DATASET[0], DATASET[1], {"prompt_filename_compose": "x"}]]))
    with pytest.raises(InputError, match="single concepts"):
        load_concepts(root / "dataset_multiconcept.json", sources)


def test_yaml_concepts(tmp_path):
    cat, mug = load_concepts(write_concepts_yaml(tmp_path))
    assert cat.source == str(tmp_path / "cat.safetensors")
    assert cat.prompts == ("photo of a {}.", "{} playing badminton.", "{} in times square.")
    assert (mug.source, mug.class_word, mug.strength) == ("someone/mug-lora", "coffee mug", 0.8)
    assert mug.prompt("a {} on a table") == "a <mug> on a table"
    assert mug.text_prompt("a {} on a table") == "a coffee mug on a table"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda text: text.replace("    trigger: <mug>\n", ""), "concept 2 lacks trigger"),
        (lambda text: text.replace("name: mug", "name: cat"), "appears twice"),
        (lambda text: text.replace("name: mug", "name: my mug"), "letters, digits"),
        (lambda text: text.replace("a {} on a table", "a mug on a table"), "has no {} for the concept"),
        (lambda text: text.replace("refs/mug", "refs/none"), "does not exist"),
        (lambda text: text.replace("prompts/cat.txt", "prompts/none.txt"), "cannot read the prompt file"),
        (lambda text: text.replace("strength: 0.8", "strength: strong"), "strength must be a number"),
        (lambda text: "concepts: [", "not valid YAML"),
        (lambda text: "other: 1", "non-empty list under 'concepts:'"),
    ],
)
def test_bad_yaml_says_what_is_wrong_in_one_line(tmp_path, edit, message):
    path = write_concepts_yaml(tmp_path)
    path.write_text(edit(path.read_text()))
    with pytest.raises(InputError, match=message) as caught:
        load_concepts(path)
    assert "\n" not in str(caught.value)
