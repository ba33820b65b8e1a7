"""modules/script_callbacks.py: ``on_before_ui(callback)``."""

before_ui_callbacks = []


def on_before_ui(callback):
    before_ui_callbacks.append(callback)
