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


@pytest.fixture(scope="session")
def own_run(kanji_root, tmp_path_factory) -> dict:
    """The kanji fixture as your own data and a model trained on it, once per session.

    ``folder``: all 48 classes as ``train/<class>/<font>.jpg`` (no test/: fastiaa draws the split);
    ``run``: the run directory of a 1-epoch training on it (512-d, 48 px crops, a refresh and
    synthesis in that epoch); ``checkpoint``: its best.pt; ``config``: its TrainConfig.
    """
    import os

    from fastiaa.config import TrainConfig
    from fastiaa.data import load_dataset
    from fastiaa.train import Trainer

    root = tmp_path_factory.mktemp("own")
    kanji = load_dataset("kanji", kanji_root)
    for images in (kanji.train, kanji.test):
        for path, label in zip(images.paths, images.labels):
            target = root / "folder" / "train" / images.class_ids[label] / Path(path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    cfg = TrainConfig.build(dataset="folder", data=str(root / "folder"), backbone="efficientnet_lite0",
                            image_size=48, resize_size=56, batch=24, eval_batch=64, num_image_per_class=3,
                            iter_per_epoch=2, epochs=1, start_epoch=0, update_every_M_epoch=1, lr=1e-4,
                            embedding_size=512, workers=0, save_dir=str(root / "runs"), name="run", seed=0)
    Trainer(cfg).run()
    return {"folder": root / "folder", "run": cfg.run_dir(), "checkpoint": cfg.run_dir() / "best.pt", "config": cfg}
