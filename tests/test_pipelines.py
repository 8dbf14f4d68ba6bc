"""fastiaa.pipelines: DALI (CPU backend) against the torchvision reference, the docs/method.md §2 crop and flip
distributions, sampler order, eval coverage, error messages and memory across epochs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from fastiaa.data import BalancedBatchSampler, ImageSet, load_dataset
from fastiaa.errors import UnreadableImageError
from fastiaa.pipelines import NORMALIZATIONS, Batch, Normalization, build_eval_loader, build_train_loader
from fastiaa.pipelines import core, dali

KINDS = ("torchvision", "dali")
LEVELS = Normalization(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), bgr=False, scale=255.0)  # out = uint8 value


@pytest.fixture(scope="module")
def kanji(kanji_root):
    return load_dataset("kanji", kanji_root)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> ImageSet:
    """8 JPEG photos of odd, different sizes (portrait and landscape), 4 classes x 2."""
    import skimage.data as sd

    root = tmp_path_factory.mktemp("photos")
    bases = [sd.astronaut(), sd.coffee(), sd.chelsea(), sd.rocket()]
    sizes = [(301, 257), (257, 389), (333, 333), (180, 411), (413, 263), (275, 275), (260, 517), (391, 299)]
    paths = []
    for k, (h, w) in enumerate(sizes):
        path = root / f"{k}.jpg"
        Image.fromarray(bases[k % 4]).resize((w, h), Image.BILINEAR).save(path, quality=90)
        paths.append(str(path))
    return ImageSet(tuple(paths), np.arange(8) // 2, ("a", "b", "c", "d"))


@pytest.fixture(scope="module")
def coordinates(tmp_path_factory) -> ImageSet:
    """A 256x256 PNG whose pixels encode their position: R = x, G = y, B = 128 (4 classes x 2 copies)."""
    y, x = np.mgrid[0:256, 0:256]
    pixels = np.stack([x, y, np.full_like(x, 128)], -1).astype(np.uint8)
    root = tmp_path_factory.mktemp("coordinates")
    paths = []
    for k in range(8):
        Image.fromarray(pixels).save(root / f"{k}.png")
        paths.append(str(root / f"{k}.png"))
    return ImageSet(tuple(paths), np.arange(8) // 2, ("a", "b", "c", "d"))


def levels(batches) -> np.ndarray:
    """Concatenated images of ``Batch``es as float64 [N, 3, H, W]."""
    return torch.cat([b.images.float() for b in batches]).double().numpy()


# -- the paper's values -----------------------------------------------------------------------------
def test_normalizations_follow_spec():
    pixels = torch.tensor([[[[0, 128, 255]]]], dtype=torch.uint8)         # one RGB pixel [1,1,1,3]
    imagenet = core.normalize_nhwc(pixels, NORMALIZATIONS["imagenet"], torch.float32)[0, :, 0, 0].double()
    expected = [(v / 255 - m) / s for v, m, s in zip((0, 128, 255), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    assert imagenet.tolist() == pytest.approx(expected, abs=1e-6)
    bgr = torch.tensor([[[[255, 128, 0]]]], dtype=torch.uint8)            # the same pixel in BGR order
    bn = core.normalize_nhwc(bgr, NORMALIZATIONS["bninception"], torch.float32)[0, :, 0, 0]
    assert bn.tolist() == [255 - 104, 128 - 117, 0 - 128]
    assert NORMALIZATIONS["bninception"].bgr and not NORMALIZATIONS["imagenet"].bgr


def test_crop_window_rule_transcribed():
    """core.crop_windows == a float64 transcription of RandomResizedCrop.get_params on the same draws."""
    def reference(u, height, width, scale=(0.16, 1.0), ratio=(0.75, 1.33)):
        area = height * width
        for t in range(10):
            target = area * (scale[0] + u[t] * (scale[1] - scale[0]))
            aspect = math.exp(math.log(ratio[0]) + u[10 + t] * (math.log(ratio[1]) - math.log(ratio[0])))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(u[20] * (height - h + 1)), int(u[21] * (width - w + 1)), h, w, u[22] < 0.5
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, int(round(width / ratio[0]))
        elif in_ratio > ratio[1]:
            w, h = int(round(height * ratio[1])), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w, u[22] < 0.5

    draws = np.concatenate([core.augment_draws(1, e, s, 50) for e in range(2) for s in range(4)])
    heights = np.resize([256, 256, 341, 256, 256, 90], len(draws))
    widths = np.resize([256, 300, 256, 1400, 30, 256], len(draws))     # includes fallback shapes
    got = np.stack(core.crop_windows(draws, heights, widths), 1)
    want = np.array([reference(u, h, w) for u, h, w in zip(draws, heights, widths)])
    np.testing.assert_array_equal(got, want)
    # a 256x1400 strip never fits: the whole height, width clamped to ratio 1.33, centred
    strip = core.crop_windows(draws[:1], [256], [1400])
    assert [int(v[0]) for v in strip[:4]] == [0, (1400 - 340) // 2, 256, 340]


def test_crop_and_flip_distributions_match_torchvision():
    """Area fraction and aspect ratio vs torchvision's own sampler (two-sample KS), flip rate 1/2."""
    from torchvision.transforms import RandomResizedCrop

    n, (height, width) = 12000, (256, 341)
    draws = np.concatenate([core.augment_draws(0, 0, s, 500) for s in range(n // 500)])
    top, left, h, w, flip = core.crop_windows(draws, np.full(n, height), np.full(n, width))
    torch.manual_seed(0)
    tv = np.array([RandomResizedCrop.get_params(torch.empty(1, height, width), [0.16, 1.0], [0.75, 1.33])
                   for _ in range(n)])

    def ks(a, b):
        grid = np.sort(np.concatenate([a, b]))
        return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                      - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()

    area, tv_area = h * w / (height * width), tv[:, 2] * tv[:, 3] / (height * width)
    assert area.min() >= 0.155 and area.max() <= 1.0
    assert ks(area, tv_area) < 0.025                        # 1.73 * sqrt(2/n): alpha ~ 0.005
    assert ks(np.log(w / h), np.log(tv[:, 3] / tv[:, 2])) < 0.025
    assert ks(top / (height - h + 1), tv[:, 0] / (height - tv[:, 2] + 1)) < 0.025
    assert np.all((top >= 0) & (top + h <= height) & (left >= 0) & (left + w <= width))
    assert abs(flip.mean() - 0.5) < 4 * math.sqrt(0.25 / n)
    # deterministic in (seed, epoch, batch) and different across them
    np.testing.assert_array_equal(core.augment_draws(3, 2, 7, 4), core.augment_draws(3, 2, 7, 4))
    assert not np.array_equal(core.augment_draws(3, 2, 7, 4), core.augment_draws(3, 3, 7, 4))


def test_resize_geometry_follows_torchvision():
    from torchvision.transforms import CenterCrop, Resize

    sizes = [(301, 257), (257, 389), (333, 333), (180, 411), (413, 263), (260, 517)]
    h, w = core.resized_shape([s[0] for s in sizes], [s[1] for s in sizes], "shorter", 256)
    for (height, width), rh, rw in zip(sizes, h, w):
        assert Resize(256)(Image.new("RGB", (width, height))).size == (rw, rh)
    top, left = core.centre_crop_origin(h, w, 224)
    for rh, rw, t, l in zip(h, w, top, left):   # CenterCrop keeps the pixel at (t, l) as its origin
        ramp = np.arange(rh * rw, dtype=np.int32).reshape(rh, rw)
        assert CenterCrop(224)(torch.from_numpy(ramp)[None])[0, 0, 0] == ramp[t, l]
    assert [a.tolist() for a in core.resized_shape([5], [9], "square", 256)] == [[256], [256]]


# -- DALI against the reference -----------------------------------------------------------------
@pytest.mark.parametrize("resize", ["square", "shorter"])
def test_eval_dali_matches_torchvision(kanji, photos, resize):
    """Resize + centre crop: identical up to one uint8 level (the resize filters' rounding)."""
    images = photos if resize == "shorter" else kanji.test
    out = {k: levels(build_eval_loader(k, images, 16, LEVELS, resize, num_threads=1)) for k in KINDS}
    diff = np.abs(out["dali"] - out["torchvision"])
    print(f"eval {resize}: max |DALI - torchvision| = {diff.max():.0f} levels, mean {diff.mean():.4f}")
    assert diff.max() <= 1.0 and diff.mean() < 0.25


@pytest.mark.parametrize("resize", ["square", "shorter"])
def test_train_dali_matches_torchvision(kanji, photos, resize):
    """Same (seed, epoch): same windows and flips. Inside the window's outer pixel ring the two
    resize implementations agree to 2 uint8 levels; on the ring PIL renormalises the filter at the
    crop edge while DALI reads the real neighbour pixels outside the window."""
    images = photos if resize == "shorter" else kanji.train
    out = {}
    for kind in KINDS:
        sampler = BalancedBatchSampler(images.labels, 8, 2, 3, seed=4)
        loader = build_train_loader(kind, images, sampler, LEVELS, resize, seed=9, num_threads=1)
        loader.set_epoch(1)
        out[kind] = levels(loader)
    diff = np.abs(out["dali"] - out["torchvision"])
    inner = diff[:, :, 1:-1, 1:-1]
    print(f"train {resize}: max |DALI - torchvision| = {inner.max():.0f} levels inside the ring, "
          f"{diff.max():.0f} on it; mean {diff.mean():.3f}")
    assert inner.max() <= 2.0 and diff.mean() < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_train_applies_the_drawn_windows(coordinates, kind):
    """Recover every crop window and flip from a coordinate-encoding image; they must be the ones
    core.crop_windows drew for (seed, epoch, batch, position)."""
    sampler = BalancedBatchSampler(coordinates.labels, 8, 2, 4, seed=0)
    loader = build_train_loader(kind, coordinates, sampler, LEVELS, "square", seed=2, num_threads=1)
    loader.set_epoch(3)
    x = np.arange(224, dtype=np.float64)
    for step, batch in enumerate(loader):
        top, left, h, w, flip = core.crop_windows(core.augment_draws(2, 3, step, 8), np.full(8, 256), np.full(8, 256))
        pixels = batch.images.double().numpy()
        for p in range(8):
            inner = slice(4, 220)
            slope_x, icpt_x = np.polyfit(x[inner], pixels[p, 0, inner, inner].mean(0), 1)
            slope_y, icpt_y = np.polyfit(x[inner], pixels[p, 1, inner, inner].mean(1), 1)
            assert (slope_x < 0) == flip[p]
            if flip[p]:   # value(x) = left + (223 - x + 0.5) * w / 224 - 0.5
                icpt_x += 223 * slope_x
            # within 1 px: the uint8 rounding of a ramp of slope ~1 biases the fit by up to ~1/216
            assert abs(slope_x) * 224 == pytest.approx(w[p], abs=1.0)
            assert slope_y * 224 == pytest.approx(h[p], abs=1.0)
            assert icpt_x - 0.5 * abs(slope_x) + 0.5 == pytest.approx(left[p], abs=1.0)
            assert icpt_y - 0.5 * slope_y + 0.5 == pytest.approx(top[p], abs=1.0)


# -- order, coverage, reproducibility ------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_train_follows_sampler_and_reproduces_epochs(kanji, kind):
    images = kanji.train
    sampler = BalancedBatchSampler(images.labels, 12, 3, 4, seed=5)
    loader = build_train_loader(kind, images, sampler, NORMALIZATIONS["imagenet"], "square", resize_size=72,
                                crop_size=64, seed=1, num_threads=2)
    assert len(loader) == 4
    seen = {}
    for epoch in (0, 1, 0):
        loader.set_epoch(epoch)
        batches = list(loader)                      # kept: no batch may be overwritten by the next
        expected = list(sampler)
        assert [b.indices.tolist() for b in batches] == expected
        for b in batches:
            assert isinstance(b, Batch) and b.labels.dtype == b.indices.dtype == torch.int64
            assert b.labels.tolist() == images.labels[b.indices.numpy()].tolist()
            assert b.images.shape == (12, 3, 64, 64) and b.images.dtype == torch.float32
            assert b.images.is_contiguous(memory_format=torch.channels_last)
        stacked = torch.stack([b.images for b in batches])
        if epoch in seen:
            assert torch.equal(stacked, seen[epoch])   # set_epoch(e) reproduces epoch e exactly
        seen[epoch] = stacked
    assert not torch.equal(seen[0], seen[1])
    # a new loader (a resumed run) continues the same stream; an abandoned pass does not disturb it
    resumed = build_train_loader(kind, images, BalancedBatchSampler(images.labels, 12, 3, 4, seed=5),
                                 NORMALIZATIONS["imagenet"], "square", resize_size=72, crop_size=64, seed=1,
                                 num_threads=2)
    resumed.set_epoch(1)
    next(iter(resumed))
    assert torch.equal(torch.stack([b.images for b in resumed]), seen[1])


@pytest.mark.parametrize("kind", KINDS)
def test_eval_returns_every_image_once_with_partial_last_batch(kanji, kind):
    images = kanji.test
    batches = list(build_eval_loader(kind, images, 50, NORMALIZATIONS["bninception"], "square", resize_size=72,
                                     crop_size=64, num_threads=2))
    sizes = [len(b.indices) for b in batches]
    assert sizes == [50] * (len(images) // 50) + [len(images) % 50] and len(images) % 50
    assert torch.cat([b.indices for b in batches]).tolist() == list(range(len(images)))
    assert torch.cat([b.labels for b in batches]).tolist() == images.labels.tolist()
    assert all(b.images.shape[1:] == (3, 64, 64) for b in batches)


@pytest.mark.parametrize("kind", KINDS)
def test_half_precision_outputs(kanji, kind):
    images = ImageSet(kanji.test.paths[:10], kanji.test.labels[:10], kanji.test.class_ids)
    full = levels(build_eval_loader(kind, images, 4, NORMALIZATIONS["imagenet"], "square", num_threads=1))
    for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
        batches = list(build_eval_loader(kind, images, 4, NORMALIZATIONS["imagenet"], "square", num_threads=1,
                                         dtype=dtype))
        assert all(b.images.dtype == dtype and b.images.is_contiguous(memory_format=torch.channels_last)
                   for b in batches)
        assert np.abs(levels(batches) - full).max() <= tol * np.abs(full).max()


# -- failures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_image_is_named(kanji, tmp_path, kind, damage):
    good = list(kanji.test.paths[:7])
    bad = tmp_path / f"broken_{damage}.jpg"
    if damage == "garbage":
        bad.write_bytes(b"this is not an image at all" * 10)
    elif damage == "truncated":
        data = open(good[0], "rb").read()
        bad.write_bytes(data[: len(data) // 2])
    images = ImageSet(tuple(good[:5] + [str(bad)] + good[5:]), np.zeros(8, np.int64), ("x",))
    # torchvision with 2 threads: from a worker process, as one line (not the worker's traceback)
    threads = 2 if (kind, damage) == ("torchvision", "garbage") else 1
    with pytest.raises(UnreadableImageError, match=f"^cannot read or decode image '{bad}'") as error:
        for _ in build_eval_loader(kind, images, 3, NORMALIZATIONS["imagenet"], "square", num_threads=threads):
            pass
    assert error.value.path == str(bad) and "Traceback" not in str(error.value)


def test_missing_dali_points_to_torchvision(kanji, monkeypatch):
    monkeypatch.setattr(dali, "_IMPORT_ERROR", ImportError("No module named 'nvidia.dali'"))
    with pytest.raises(ImportError, match="--loader torchvision"):
        build_eval_loader("dali", kanji.test, 8, NORMALIZATIONS["imagenet"], "square")


def test_bad_arguments_are_rejected(kanji):
    args = (kanji.test, 8, NORMALIZATIONS["imagenet"])
    with pytest.raises(ValueError, match="kind"):
        build_eval_loader("pil", *args, "square")
    with pytest.raises(ValueError, match="resize"):
        build_eval_loader("dali", *args, "longer")
    with pytest.raises(ValueError, match="crop_size"):
        build_eval_loader("dali", *args, "square", resize_size=200, crop_size=224)
    with pytest.raises(ValueError, match="dtype"):
        build_eval_loader("dali", *args, "square", dtype=torch.float64)


# -- memory ------------------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("kind", KINDS)
def test_memory_does_not_grow_across_epochs(kanji, kind):
    images = kanji.train
    sampler = BalancedBatchSampler(images.labels, 24, 4, 6, seed=0)
    loader = build_train_loader(kind, images, sampler, NORMALIZATIONS["imagenet"], "square", resize_size=72,
                                crop_size=64, num_threads=1)
    rss = []
    for epoch in range(8):
        loader.set_epoch(epoch)
        for _ in loader:
            pass
        rss.append(_rss_mib())
    print(f"{kind}: RSS after epochs 2..8 (MiB): {[round(r) for r in rss[1:]]}")
    assert rss[-1] - rss[2] < 8.0      # one batch is 24 x 64 x 64 x 3 x 4 B = 1.1 MiB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pipeline_matches_cpu(kanji):
    """GPU decode (nvJPEG) + GPU resize against the CPU graph: a few levels of decoder difference."""
    cpu = levels(build_eval_loader("dali", kanji.test, 64, LEVELS, "square"))
    batches = list(build_eval_loader("dali", kanji.test, 64, LEVELS, "square", device="cuda"))
    assert all(b.images.is_cuda and b.images.is_contiguous(memory_format=torch.channels_last) for b in batches)
    diff = np.abs(torch.cat([b.images for b in batches]).double().cpu().numpy() - cpu)
    print(f"GPU vs CPU DALI eval: max {diff.max():.0f} levels, mean {diff.mean():.3f}")
    assert diff.mean() < 1.0
