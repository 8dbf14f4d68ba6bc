"""Atomic checkpoints and result files, and the RNG state a resumed run needs.

Everything is written to a temporary file in the target folder, flushed to disk, then
renamed over the target, so a killed run never leaves a half-written file behind.
"""
from __future__ import annotations

import errno
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
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as error:  # named by the file the user asked for, not by the temporary one
        raise OSError(error.errno, error.strerror, str(path)) from error
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        disk = _disk_error(error)
        if disk is not None and disk is not error:  # e.g. torch.save turns "no space left" into a RuntimeError
            raise OSError(disk.errno, disk.strerror, str(path)) from error
        raise


def _disk_error(error: BaseException) -> OSError | None:
    """The OSError behind ``error`` (itself, or along its chain of causes), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def check_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` and write (then remove) a file in it, so that a run learns at once, not at
    its first checkpoint, that it cannot write there; the folders it created are removed again (the
    first write creates them), so that a run refused later leaves no empty folder behind.

    Raises:
        OSError: the folder cannot be created or written (a file stands there, read-only, full, ...).
    """
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a file, not a folder", str(parent))
    created = [p for p in (folder, *folder.parents) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / ".write-check"
    try:
        atomic_write_text(probe, "fastiaa")
        probe.unlink()
    finally:
        for path in created:  # deepest first
            path.rmdir()


def remove_partial_writes(folder: str | os.PathLike, names) -> list[Path]:
    """Delete the temporary files that interrupted :func:`atomic_write` calls of the files ``names``
    left in ``folder`` (``.NAME.XXXX``; a finished write has renamed its own); returns them."""
    folder = Path(folder)
    stale = [p for name in names for p in folder.glob(f".{name}.*") if p.is_file()] if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


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
