"""CustomConcept101's metrics, as its evaluate.py computes them, on transformers models.

Followed: adobe-research/custom-diffusion, ``customconcept101/evaluate.py`` (commit 7c19c9a7820d):
- preprocessing, lines 47-55 (CLIP: Resize(224, bicubic) of the shorter side, CenterCrop(224), RGB, ToTensor,
  Normalize with CLIP's mean/std) and 73-80 (DINO: Resize(256, bicubic), CenterCrop(224), RGB, ToTensor, Normalize
  with ImageNet's mean/std). Here 224 is the model's own image size and 256 scales with it; torchvision's Resize and
  CenterCrop on PIL images are reproduced below (it is not a dependency).
- features, lines 92-120: CLIP ``encode_text`` / ``encode_image`` (= transformers' ``get_text_features`` /
  ``get_image_features``: the projected pooled features); DINO ``dino_vits16``'s forward, which returns the class
  token after the final norm (= ``ViTModel``'s ``last_hidden_state[:, 0]``, not its pooler).
- text alignment, lines 123-149: each feature divided by its L2 norm, then ``2.5 * max(cos, 0)`` per image against
  its own prompt (truncated to 77 tokens, no prefix).
- image alignment, lines 178-221: both sides L2-normalized, the mean of ``image @ references.T``: per image, the mean
  cosine against every reference image (no weight, no clipping); CLIP and DINO alike.
The caption in prompts.json is the user's; we give it the prompt with the class word in place of the concept.
Not followed: on CUDA, evaluate.py runs CLIP in float16 (clip.load, line 114); we run both models in float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TEXT_WEIGHT = 2.5
BATCH = 64


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``Resize(size, BICUBIC)`` on a PIL image: the shorter side to ``size``, the longer truncated."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_short, new_long = size, int(size * long / short)
    new = (new_short, new_long) if width <= height else (new_long, new_short)
    return image if new == image.size else image.resize(new, Image.Resampling.BICUBIC)


def _center_crop(image: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` on an image at least ``size`` on each side."""
    width, height = image.size
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def preprocess(image: Image.Image, resize: int, crop: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize, CenterCrop, RGB, ToTensor, Normalize, in evaluate.py's order: a (3, crop, crop) float tensor."""
    image = _center_crop(_resize_shorter(image, resize), crop).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (pixels - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _unit_rows(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    return features / np.sqrt(np.sum(features**2, axis=1, keepdims=True))


def text_alignment(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """Per image: ``2.5 * max(cos(image_i, text_i), 0)``."""
    return TEXT_WEIGHT * np.clip(np.sum(_unit_rows(image_features) * _unit_rows(text_features), axis=1), 0, None)


def image_alignment(image_features: np.ndarray, reference_features: np.ndarray) -> np.ndarray:
    """Per image: the mean cosine against every reference image."""
    return (_unit_rows(image_features) @ _unit_rows(reference_features).T).mean(axis=1)


def _pooled(output: torch.Tensor | object) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose pooler_output is the projection (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output  # type: ignore[attr-defined]


@dataclass
class Scores:
    """One image's three scores."""

    text_alignment: float
    image_alignment: float
    dino_alignment: float


class FeatureModels:
    """CLIP (transformers ``CLIPModel`` and its tokenizer) and DINO (``ViTModel``), loaded once, in float32."""

    def __init__(self, clip_id: str, dino_id: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel, ViTModel

        self.device = torch.device(device)
        self.clip = CLIPModel.from_pretrained(clip_id).eval().to(self.device, torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(clip_id)
        self.dino = ViTModel.from_pretrained(dino_id, add_pooling_layer=False).eval().to(self.device, torch.float32)
        self.clip_size = int(self.clip.config.vision_config.image_size)
        self.dino_size = int(self.dino.config.image_size)

    @torch.no_grad()
    def clip_text(self, texts: Sequence[str]) -> np.ndarray:
        tokens = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.clip.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        return _pooled(self.clip.get_text_features(**tokens)).float().cpu().numpy()

    @torch.no_grad()
    def clip_image(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self._batched(images, self.clip_size, self.clip_size, CLIP_MEAN, CLIP_STD, self._clip_forward)

    @torch.no_grad()
    def dino_image(self, images: Sequence[Image.Image]) -> np.ndarray:
        resize = round(self.dino_size * 256 / 224)
        return self._batched(images, resize, self.dino_size, IMAGENET_MEAN, IMAGENET_STD, self._dino_forward)

    def _clip_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _pooled(self.clip.get_image_features(pixel_values=pixels))

    def _dino_forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.dino(pixel_values=pixels).last_hidden_state[:, 0]

    def _batched(
        self,
        images: Sequence[Image.Image],
        resize: int,
        crop: int,
        mean: Sequence[float],
        std: Sequence[float],
        forward: Callable[[torch.Tensor], torch.Tensor],
    ) -> np.ndarray:
        parts = []
        for start in range(0, len(images), BATCH):
            pixels = torch.stack([preprocess(image, resize, crop, mean, std) for image in images[start : start + BATCH]])
            parts.append(forward(pixels.to(self.device)).float().cpu().numpy())
        return np.concatenate(parts)


@dataclass
class References:
    """A concept's reference-image features, computed once."""

    clip: np.ndarray
    dino: np.ndarray

    @classmethod
    def of(cls, models: FeatureModels, images: Sequence[Image.Image]) -> References:
        return cls(models.clip_image(images), models.dino_image(images))


def score(models: FeatureModels, images: Sequence[Image.Image], text: str, references: References) -> list[Scores]:
    """The three scores of each image against one text prompt and a concept's references."""
    clip_features = models.clip_image(images)
    text_features = np.repeat(models.clip_text([text]), len(images), axis=0)
    texts = text_alignment(clip_features, text_features)
    clips = image_alignment(clip_features, references.clip)
    dinos = image_alignment(models.dino_image(images), references.dino)
    return [Scores(float(t), float(c), float(d)) for t, c, d in zip(texts, clips, dinos)]
