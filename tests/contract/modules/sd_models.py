"""Forge's modules/sd_models.py ``forge_model_reload()`` (l.473): loads the selected checkpoint unless it is the one
loaded, and returns ``(sd_model, reloaded)``; ``processing.process_images`` calls it first (processing.py 804).
Tests set ``shared.sd_model`` themselves and count the calls."""

from . import shared

reloads = []


def forge_model_reload():
    reloads.append(shared.sd_model)
    return shared.sd_model, False
