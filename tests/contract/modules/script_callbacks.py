"""modules/script_callbacks.py: ``on_before_ui(callback)`` (l.588), ``on_infotext_pasted(callback)`` (l.572), called
with ``(infotext, params)`` by ``infotext_pasted_callback`` (l.378) before the paste fields are read."""

before_ui_callbacks = []
infotext_pasted_callbacks = []


def on_before_ui(callback):
    before_ui_callbacks.append(callback)


def on_infotext_pasted(callback):
    infotext_pasted_callbacks.append(callback)
