"""Atomic checkpoints and result files, and the RNG state a resumed run needs.

Everything is written to a temporary file in the target folder, flushed to disk, then
renamed over the target, so a killed run never leaves a half-written file behind.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastiaa.config import TrainConfig


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state)`` atomically."""
    atomic_write(path, lambda f: torch.save(state, f))


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save`.

    Raises:
        FileNotFoundError: no checkpoint at ``path`` (the message says how to start afresh).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # pickle / zip errors say nothing useful on their own
        raise ValueError(f"{path} is not a checkpoint written by fastiaa (unreadable: {error!r})") from error


def config_of(state: dict) -> TrainConfig:
    """The training configuration stored in a checkpoint written by ``fastiaa train``.

    Raises:
        ValueError: the checkpoint holds no fastiaa configuration (e.g. a plain ``state_dict``).
    """
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ValueError("not a checkpoint written by `fastiaa train` (no 'config' and 'model' entries); "
                         "pass a best.pt or last.pt from a run directory")
    return TrainConfig.from_dict(state["config"])


def rng_state() -> dict:
    """The Python, NumPy, torch CPU and CUDA generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
