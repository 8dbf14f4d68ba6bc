"""Decode once (fastiaa.pipelines.cache): cached batches equal uncached ones bit for bit with either
loader, the placement falls back instead of running out of memory, a persistent cache is reused,
and a stale, corrupt or truncated one is rebuilt, never read."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fastiaa.data import BalancedBatchSampler, ImageSet, load_dataset
from fastiaa.pipelines import NORMALIZATIONS, build_cache, build_eval_loader, build_train_loader
from fastiaa.pipelines import cache as caching

KINDS = ("torchvision", "dali")


@pytest.fixture(scope="module")
def kanji(kanji_root):
    return load_dataset("kanji", kanji_root).train


@pytest.fixture(scope="module")
def odd_photos(tmp_path_factory) -> ImageSet:
    """12 photos of odd sizes (portrait and landscape) for the shorter-side resize, 4 classes x 3."""
    import skimage.data as sd
    from PIL import Image

    root = tmp_path_factory.mktemp("odd")
    bases = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket()]
    paths = []
    for k, (h, w) in enumerate([(301, 257), (257, 389), (333, 333), (180, 411), (413, 263), (275, 275),
                                (260, 517), (391, 299), (290, 300), (300, 290), (199, 201), (450, 240)]):
        Image.fromarray(bases[k % 4]).resize((w, h), Image.BILINEAR).save(root / f"{k}.jpg", quality=90)
        paths.append(str(root / f"{k}.jpg"))
    return ImageSet(tuple(paths), np.arange(12) // 3, ("a", "b", "c", "d"))


def batches(loader):
    return [(b.images.clone(), b.labels.clone(), b.indices.clone()) for b in loader]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["square-imagenet", "square-bninception", "shorter"])
def test_cached_batches_equal_uncached_ones(kanji, odd_photos, kind, case):
    """Train epochs (crop windows and flips of the epoch), refreshes (centre crops of the resized
    cache) and evaluations (the crop cache): the very same tensors as without a cache."""
    images = odd_photos if case == "shorter" else kanji
    resize, size, crop = ("shorter", 160, 128) if case == "shorter" else ("square", 72, 64)
    geo = dict(normalization=NORMALIZATIONS["bninception" if "bninception" in case else "imagenet"],
               resize=resize, resize_size=size, crop_size=crop, num_threads=1)  # no worker processes: fast
    resized = build_cache(kind, images, "resized", **geo)
    crops = build_cache(kind, images, "crop", **geo)
    assert resized.storage.numel() == resized.layout.nbytes  # packed: no padding between images
    if case == "shorter":
        assert len({tuple(s) for s in resized.layout.shapes}) > 3 and min(resized.layout.shapes.min(1)) == size
    plain = batches(build_eval_loader(kind, images, 5, **geo))
    assert same(plain, batches(build_eval_loader(kind, images, 5, cache=resized, **geo)))
    assert same(plain, batches(build_eval_loader(kind, images, 5, cache=crops, **geo)))
    sampler = BalancedBatchSampler(images.labels, 12 if case == "shorter" else 24, 3, 3, seed=0)
    runs = []
    for cache in (None, resized):
        loader = build_train_loader(kind, images, sampler, seed=4, cache=cache, **geo)
        loader.set_epoch(3)
        runs.append(batches(loader))
    assert same(*runs) and len(runs[0]) == 3


def test_the_cache_holds_the_first_stage_pixels(kanji):
    """The resized cache holds the torchvision loader's stage 1 (decode + resize) to the byte."""
    from PIL import Image

    cache = build_cache("torchvision", kanji, "resized", NORMALIZATIONS["imagenet"], "square", 40, 32, 1)
    with Image.open(kanji.paths[7]) as im:
        want = np.asarray(im.convert("RGB").resize((40, 40), Image.BILINEAR))
    got = cache.image(7).numpy()
    assert got.shape == (40, 40, 3) and np.abs(got.astype(int) - want.astype(int)).max() <= 1  # PIL's antialias


def test_placement_falls_back_instead_of_running_out_of_memory(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert caching.choose("auto", 2**20, cpu, 1.0)[0] == "ram"
    place, note = caching.choose("auto", 2**31, cpu, 1.0)
    assert place == "off" and "do not fit the --cache-gib 1.0" in note
    assert caching.choose("ram", 2**31, cpu, 1.0)[0] == "off"
    with pytest.raises(ValueError, match="CUDA --device"):
        caching.choose("device", 1, cpu, None)
    monkeypatch.setattr(caching, "free_bytes", lambda where, device: {"device": 4 * 2**30, "ram": 64 * 2**30}[where])
    assert caching.choose("auto", 1 * 2**30, gpu, None) == ("device", "cache: 1.00 GiB of decoded images in GPU memory")
    assert caching.choose("device", 3 * 2**30, gpu, None)[0] == "ram"   # beyond half the free GPU memory
    assert caching.choose("auto", 40 * 2**30, gpu, None)[0] == "off"
    with pytest.raises(ValueError, match="off, auto, ram, device"):
        caching.choose("disk", 1, cpu, None)


def test_persistent_cache_is_reused_and_rebuilt_when_stale_or_damaged(kanji, tmp_path):
    images = ImageSet(kanji.paths[:16], kanji.labels[:16], kanji.class_ids)
    geo = dict(normalization=NORMALIZATIONS["imagenet"], resize="square", resize_size=40, crop_size=32, num_threads=0)
    decoded, notes = [], []

    def build():
        return build_cache("torchvision", images, "crop", cache_dir=tmp_path / "c", progress=decoded.append,
                           say=notes.append, **geo)

    first = build()
    files = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert sum(decoded) == 16 and len(files) == 2 and not notes
    reference = first.storage.clone()
    assert torch.equal(build().storage, reference) and sum(decoded) == 16      # mapped, not decoded again
    data = next((tmp_path / "c").glob("*.u8"))
    with open(data, "r+b") as f:  # a flipped byte
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert torch.equal(build().storage, reference) and sum(decoded) == 32 and "corrupt" in notes[-1]
    with open(data, "r+b") as f:
        f.truncate(100)
    assert torch.equal(build().storage, reference) and "truncated" in notes[-1]
    os.utime(images.paths[3], ns=(1, 1))  # the dataset changed: another key, a new file
    build()
    assert sum(decoded) == 64 and len(list((tmp_path / "c").glob("*.u8"))) == 2
    assert not list((tmp_path / "c").glob(".*tmp"))   # no temporary file left behind


def test_a_run_gives_the_same_records_with_and_without_the_cache(kanji_root, tmp_path):
    from fastiaa.config import TrainConfig
    from fastiaa.train import Trainer

    records = []
    for cache in ("off", "ram"):
        cfg = TrainConfig.build(dataset="kanji", data=str(kanji_root), backbone="efficientnet_lite0", image_size=48,
                                resize_size=56, batch=24, eval_batch=96, num_image_per_class=3, iter_per_epoch=1,
                                epochs=2, eval_every=2, start_epoch=1, update_every_M_epoch=1, lr=1e-4, embedding_size=32,
                                workers=0, correction="on", num_neighbor=5, save_dir=str(tmp_path), name=cache,
                                seed=3, cache=cache)
        trainer = Trainer(cfg)
        trainer.run()
        records.append([{k: v for k, v in r.items() if not k.endswith("_s")} for r in trainer.log.records])
    assert records[0] == records[1] and len(records[0]) == 3 and records[0][2]["lambda"] > 0
    # `fastiaa eval --cache-dir`: the test crops decoded into a file once, then mapped
    from fastiaa.train import evaluate_checkpoint

    for _ in range(2):
        got = evaluate_checkpoint(tmp_path / "ram" / "last.pt", device="cpu", cache_dir=str(tmp_path / "c"))
        assert got["recall@1"] == records[0][-1]["recall@1"] and got["map@r"] == records[0][-1]["map@r"]
    assert len(list((tmp_path / "c").glob("*.crop.u8"))) == 1
