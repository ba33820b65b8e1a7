"""Attention maps as pictures: each map over its image in a jet colour scale at half opacity (as DAAM draws them), the
word as caption beneath, and the comparison grid of two runs (one row per word)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

OPACITY = 0.5
MIN_WIDTH = 256


def image_from_tensor(pixels: torch.Tensor) -> Image.Image:
    """An RGB image from (3, H, W) values in [0, 1]."""
    data = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
    return Image.fromarray(data.numpy())


def jet(values: torch.Tensor) -> torch.Tensor:
    """matplotlib's "jet" colour scale for values in [0, 1]: (..., 3) in [0, 1]."""
    return torch.stack([(1.5 - (4 * values - c).abs()).clamp(0, 1) for c in (3, 2, 1)], dim=-1)


def overlay(image: Image.Image, heat: torch.Tensor) -> Image.Image:
    """``heat`` (h, w, in [0, 1]) resized to the image and blended over it."""
    width, height = image.size
    resized = F.interpolate(heat.float()[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    base = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8).reshape(height, width, 3).float() / 255
    mixed = base * (1 - OPACITY) + jet(resized.clamp(0, 1)) * OPACITY
    return image_from_tensor(mixed.permute(2, 0, 1))


def _font(size: int, font: Any = None) -> Any:
    if font is not None:
        return font(size)
    try:
        return ImageFont.load_default(size)  # Pillow ≥ 10.1
    except TypeError:
        return ImageFont.load_default()


def band(text: str, width: int, font: Any = None) -> Image.Image:
    """A white band ``width`` wide with ``text`` centred on it, the font shrunk (to 9 px at least) until it fits."""
    size = max(12, width // 18)
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    _, top, _, bottom = (int(value) for value in draw.textbbox((0, 0), "Ag", font=_font(size, font)))
    height = bottom - top + size // 2
    while True:
        face = _font(size, font)
        left, top, right, bottom = (int(value) for value in draw.textbbox((0, 0), text, font=face))
        if right - left <= width - 4 or size <= 9:
            break
        size -= 1
    out = Image.new("RGB", (width, height), "white")
    position = ((width - (right - left)) // 2 - left, (height - (bottom - top)) // 2 - top)
    ImageDraw.Draw(out).text(position, text, fill="black", font=face)
    return out


def _shown(image: Image.Image) -> Image.Image:
    """The image at least ``MIN_WIDTH`` wide, for the pictures only."""
    if image.width >= MIN_WIDTH:
        return image.convert("RGB")
    return image.convert("RGB").resize((MIN_WIDTH, round(image.height * MIN_WIDTH / image.width)), Image.Resampling.LANCZOS)


def captioned(image: Image.Image, caption: str, font: Any = None) -> Image.Image:
    """The image with ``caption`` beneath it; ``font(size)`` gives the font (default: Pillow's own)."""
    below = band(caption, image.width, font)
    out = Image.new("RGB", (image.width, image.height + below.height), "white")
    out.paste(image.convert("RGB"), (0, 0))
    out.paste(below, (0, image.height))
    return out


def word_pictures(image: Image.Image, maps: torch.Tensor, captions: Sequence[str], font: Any = None) -> list[Image.Image]:
    """One captioned overlay per word; ``maps`` (words, h, w) normalised."""
    shown = _shown(image)
    return [captioned(overlay(shown, heat), caption, font) for heat, caption in zip(maps, captions)]


def grid(rows: Sequence[Sequence[Image.Image]], titles: Sequence[str] = (), font: Any = None, gap: int = 4) -> Image.Image:
    """The pictures in rows (each row as wide as its pictures), on white, under a row of column ``titles``."""
    if titles:
        rows = [[band(title, picture.width, font) for title, picture in zip(titles, rows[0])], *rows]
    width = max(sum(picture.width for picture in row) + gap * (len(row) - 1) for row in rows)
    height = sum(max(picture.height for picture in row) for row in rows) + gap * (len(rows) - 1)
    out = Image.new("RGB", (width, height), "white")
    top = 0
    for row in rows:
        left = 0
        for picture in row:
            out.paste(picture, (left, top))
            left += picture.width + gap
        top += max(picture.height for picture in row) + gap
    return out
