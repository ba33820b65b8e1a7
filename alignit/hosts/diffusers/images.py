"""Images as ``alignit generate`` writes them: PNGs whose ``parameters`` text chunk holds the settings the way the
WebUIs write infotext, and the side-by-side comparison with a caption under each half."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo


def _quoted(value: Any) -> str:
    """A value as A1111 writes it in infotext: JSON-quoted when it holds a comma, a colon or a line break."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(mark in text for mark in ",:\n") else text


def infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, Any]) -> str:
    """``prompt``, ``Negative prompt: …`` (when there is one), then ``Key: value, …`` as A1111 writes them."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quoted(value)}" for key, value in parameters.items() if value is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: Path, text: str) -> Path:
    """Write ``image`` with ``text`` in its ``parameters`` chunk (where the WebUIs' PNG info reader looks)."""
    info = PngInfo()
    info.add_text("parameters", text)
    image.save(path, pnginfo=info)
    return path


def _wrapped(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines or [""]


def compare_grid(left: Image.Image, right: Image.Image, captions: tuple[str, str]) -> Image.Image:
    """The two images side by side, each with its caption (word-wrapped) under it, on white."""
    width, height = left.size
    font = ImageFont.load_default(size=max(10, width // 28))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max(4, width // 64)
    wrapped = [_wrapped(measure, caption, font, width - 2 * margin) for caption in captions]
    line_height = int(font.size * 1.25) if hasattr(font, "size") else 12
    caption_height = 2 * margin + line_height * max(len(lines) for lines in wrapped)
    grid = Image.new("RGB", (2 * width, height + caption_height), "white")
    for index, (image, lines) in enumerate(zip((left, right), wrapped)):
        grid.paste(image.convert("RGB").resize((width, height)), (index * width, 0))
        caption = Image.new("RGB", (width, caption_height), "white")  # a word wider than its half is cut there
        draw = ImageDraw.Draw(caption)
        for number, line in enumerate(lines):
            draw.text((margin, margin + number * line_height), line, fill="black", font=font)
        grid.paste(caption, (index * width, height))
    return grid
