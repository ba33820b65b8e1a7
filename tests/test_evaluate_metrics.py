"""CustomConcept101's metrics: the formulas on known vectors by hand, the features against the models' own calls."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from evaluate_parts import blocks_image, save_tiny_clip, save_tiny_dino
from PIL import Image
from transformers import CLIPModel, ViTModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from alignit.evaluate.metrics import FeatureModels, References, image_alignment, preprocess, score, text_alignment


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("metric-models")
    return save_tiny_clip(root / "clip"), save_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def models(model_folders):
    return FeatureModels(str(model_folders[0]), str(model_folders[1]))


def test_text_alignment_is_2_5_times_the_clipped_cosine():
    images = np.array([[3.0, 4.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    texts = np.array([[8.0, 6.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    # cos: (24 + 24) / (5 * 10) = 0.96; negative -> 0; 1 / sqrt(2)
    expected = [2.5 * 0.96, 0.0, 2.5 / math.sqrt(2)]
    assert text_alignment(images, texts) == pytest.approx(expected, abs=1e-12)


def test_image_alignment_is_the_mean_cosine_over_references_unclipped():
    images = np.array([[1.0, 0.0], [0.0, 3.0]])
    references = np.array([[2.0, 0.0], [0.0, 5.0], [-1.0, -1.0]])
    s = 1 / math.sqrt(2)
    expected = [(1.0 + 0.0 - s) / 3, (0.0 + 1.0 - s) / 3]
    assert image_alignment(images, references) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("side", "offset"), [(225, 0), (226, 1), (227, 2), (229, 2), (231, 4)])
def test_center_crop_offsets_round_half_to_even_like_torchvision(side, offset):
    # torchvision CenterCrop: int(round((side - 224) / 2.0)); Resize(224) leaves the 224 side alone.
    pixels = np.arange(side * 224, dtype=np.int32).reshape(224, side)
    image = Image.fromarray((pixels % 251).astype(np.uint8)).convert("RGB")
    tensor = preprocess(image, 224, 224, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    expected = (pixels[:, offset : offset + 224] % 251) / 255.0
    assert np.allclose(tensor[0].numpy(), expected, atol=1e-6)


def test_clip_preprocessing_matches_transformers_clip_processor():
    image = blocks_image(5, (512, 768))
    mine = preprocess(image, 224, 224, CLIPImageProcessorPil.image_mean, CLIPImageProcessorPil.image_std)
    theirs = CLIPImageProcessorPil()(images=image, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(mine, theirs, atol=1e-5)


def test_image_features_equal_the_models_own_calls(model_folders, models):
    images = [blocks_image(seed, (512, 640)) for seed in range(3)]
    clip = CLIPModel.from_pretrained(model_folders[0]).eval()
    clip_pixels = CLIPImageProcessorPil()(images=images, return_tensors="pt")["pixel_values"]
    dino = ViTModel.from_pretrained(model_folders[1], add_pooling_layer=False).eval()
    dino_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 256}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
    )
    dino_pixels = dino_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        clip_expected = clip.get_image_features(pixel_values=clip_pixels).pooler_output
        dino_expected = dino(pixel_values=dino_pixels).last_hidden_state[:, 0]
    assert np.allclose(models.clip_image(images), clip_expected.numpy(), atol=1e-5)
    assert np.allclose(models.dino_image(images), dino_expected.numpy(), atol=1e-5)


def test_text_features_equal_the_models_own_call(model_folders, models):
    texts = ["a cat playing badminton", "a painting of a coffee mug in the snow, " * 12]
    clip = CLIPModel.from_pretrained(model_folders[0]).eval()
    tokens = models.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    assert tokens["input_ids"].shape[1] == 77  # the long prompt is truncated as clip.tokenize(truncate=True) does
    with torch.no_grad():
        expected = clip.get_text_features(**tokens).pooler_output
    assert np.allclose(models.clip_text(texts), expected.numpy(), atol=1e-5)


def test_scores_of_a_job_by_hand(models):
    images = [blocks_image(10), blocks_image(11)]
    references = References.of(models, [blocks_image(20), blocks_image(21), blocks_image(22)])
    scores = score(models, images, "a cat in times square", references)
    clip = models.clip_image(images)
    text = models.clip_text(["a cat in times square"])[0]
    dino = models.dino_image(images)

    def cos(a, b):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.dot(a, b) / math.sqrt(np.dot(a, a) * np.dot(b, b)))

    for i, scored in enumerate(scores):
        assert scored.text_alignment == pytest.approx(2.5 * max(cos(clip[i], text), 0.0), abs=1e-9)
        assert scored.image_alignment == pytest.approx(np.mean([cos(clip[i], r) for r in references.clip]), abs=1e-9)
        assert scored.dino_alignment == pytest.approx(np.mean([cos(dino[i], r) for r in references.dino]), abs=1e-9)
