"""ComfyUI's ``server.py`` (v0.8.0, fc0cb10b): ``PromptServer.instance`` (set when the server starts) and
``send_progress_text(text, node_id, sid=None)`` (l.1214: a text the frontend shows on the node). The contract
records the texts."""

from __future__ import annotations


class PromptServer:
    instance: PromptServer

    def __init__(self) -> None:
        self.progress_texts: list[tuple[str, str]] = []

    def send_progress_text(self, text: str | bytes, node_id: str, sid=None) -> None:
        self.progress_texts.append((text.decode() if isinstance(text, bytes) else text, str(node_id)))


PromptServer.instance = PromptServer()
