"""Errors of fastiaa that a user can act on (the command line prints them as one line)."""
from __future__ import annotations


class NonFiniteError(FloatingPointError):
    """A loss or an embedding stopped being finite; the message names where (epoch, step, pass)."""
