"""modules/sd_samplers.py:24 ``find_sampler_config(name)``; sd_samplers_common.py:15 ``total_steps``."""

from types import SimpleNamespace

SECOND_ORDER = {"Heun", "DPM2"}


def find_sampler_config(name):
    second = name in SECOND_ORDER
    return SimpleNamespace(name=name, total_steps=lambda steps: steps * 2 if second else steps)
