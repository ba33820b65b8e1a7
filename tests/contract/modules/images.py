"""modules/images.py:29 ``get_font(fontsize)``: the WebUI's caption font (Roboto from ``opts.font``); here Pillow's."""

from PIL import ImageFont


def get_font(fontsize: int):
    try:
        return ImageFont.load_default(fontsize)
    except TypeError:  # Pillow < 10.1, as the WebUIs pin (9.5.0)
        return ImageFont.load_default()
