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
