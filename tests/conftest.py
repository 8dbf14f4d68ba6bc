"""Shared fixtures: a small kanji demo dataset, built once per test session."""
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def kanji_options() -> dict:
    """build_kanji options of the ``kanji_root`` fixture: 48 classes, the first 8 default fonts, 64 px."""
    from fastiaa.data.kanji import DEFAULT_FONTS

    return dict(num_classes=48, fonts=list(DEFAULT_FONTS[:8]), image_size=64, seed=0, install=True)


@pytest.fixture(scope="session")
def kanji_root(tmp_path_factory, kanji_options) -> Path:
    """A kanji dataset in SOP format: 24 train + 24 test classes x 8 fonts, 64x64 RGB JPEGs.

    Load it with ``fastiaa.data.load_dataset("kanji", kanji_root)``.
    """
    from fastiaa.data import build_kanji

    return build_kanji(tmp_path_factory.mktemp("kanji"), **kanji_options)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly where no CUDA device is visible (``pytest -m gpu`` runs them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def photo_root(tmp_path_factory) -> Path:
    """A dataset in the SOP on-disk format (``load_dataset("kanji", photo_root)`` reads it) that needs
    no fonts: 24 train + 24 test classes x 8 images, 64 px JPEGs of a class colour plus noise.
    The GPU tests use it (the GPU machine has no CJK fonts)."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for split, classes in (("train", range(24)), ("test", range(24, 48))):
        rows = ["image_id class_id super_class_id path"]
        for c in classes:
            colour = rng.integers(0, 256, 3)
            for i in range(8):
                pixels = np.clip(colour + rng.normal(0, 40, (64, 64, 3)), 0, 255).astype(np.uint8)
                rel = f"images/{c:03d}/{i}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(root / rel, quality=90)
                rows.append(f"{len(rows)} {c + 1} 1 {rel}")
        (root / f"Ebay_{split}.txt").write_text("\n".join(rows) + "\n")
    return root
