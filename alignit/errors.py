"""Every error AlignIT raises on purpose; each message is meant for the user, in one line."""

from __future__ import annotations


class ConceptError(ValueError):
    """A concept (or an option) that cannot be used: a missing source, a bad class word, a file that can't be read."""


class LayoutMismatch(RuntimeError):
    """AlignIT's layout of a prompt differs from the host's own: the prompt is left as the host encoded it."""


class Unsupported(RuntimeError):
    """The loaded model or a host setting rules AlignIT out for this generation."""


class NotLoaded(Unsupported):
    """No checkpoint is loaded yet."""


class InputError(ValueError):
    """Bad input to a command: an option, a concepts file, a model that cannot be loaded, an output folder."""
