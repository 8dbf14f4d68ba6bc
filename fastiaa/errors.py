"""Errors of fastiaa that a user can act on (the command line prints them as one line)."""
from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A loss or an embedding stopped being finite; the message names where (epoch, step, pass)."""


class UnreadableImageError(OSError):
    """An image file that cannot be read or decoded; ``path`` names it and the message says what to do."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path = path
