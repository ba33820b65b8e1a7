"""backend/text_processing/emphasis.py:52 ``get_current_option(name)``: the emphasis class of that name
(Original when unknown); instances carry ``name``."""

NAMES = ("None", "Ignore", "Original", "No norm")


def get_current_option(emphasis_option_name):
    name = emphasis_option_name if emphasis_option_name in NAMES else "Original"
    return type(f"Emphasis{name.replace(' ', '')}", (), {"name": name})
