"""Every synthetic input of the benchmarks in bench/, in one place.

Embeddings (numpy, class centre + noise):
  sop_like           Stanford Online Products-shaped: classes of 2-12 images (docs/method.md §1)
  inshop_like        In-Shop-shaped queries and gallery: items of 2-12 images, each on both sides
  cars_like          Cars-196 train-shaped: classes of 59-97 images
  catalogue          a retrieval catalogue and its queries: clusters of very different sizes
Image folders in SOP format (``load_dataset("kanji", root)`` reads them, docs/method.md §1):
  make_photos        500x500 JPEGs cut from scikit-image's bundled colour photographs
  kanji_root         the kanji demo (data/kanji), or a small build of it when that is absent
  kanji_subset       the first classes of the kanji demo
  sop_shaped         SOP-sized split lists over the generated photos
Batches and sampling factors (torch):
  balanced_labels    labels of one balanced batch (classes x images per class)
  sop_lowrank_factor a random fastiaa.kernels.LowRankFactor with SOP's shape
Class statistics standing in for a refresh (a training step costs the same whatever they hold):
  random_embeddings  seeded standard-normal embeddings for given labels
  random_statistics  fills a fastiaa Trainer's IAA statistics (and sampling factor) from them
  random_covariance  the diagonal class covariances of them, for the authors' loop

Nothing here imports the benchmark scripts or bench.baselines.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HEADER = "image_id class_id super_class_id path"
PHOTO_SIDE = 500
PHOTO_CLASSES, PHOTOS_PER_CLASS = 64, 4
SOP_TRAIN, SOP_TEST = (59551, 11318), (60502, 11316)   # (images, classes), docs/method.md §1
KANJI_SMALL_CLASSES = 400                              # the small build when data/kanji is absent


# ------------------------------------------------------------------ embeddings

def sop_like(n: int, classes: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, dim] float32 embeddings and [n] int64 labels; class sizes 2-12 summing to n."""
    rng = np.random.default_rng(seed)
    mean = n / classes
    sizes = 2 + rng.binomial(10, (mean - 2) / 10, size=classes)
    while (excess := int(sizes.sum()) - n) != 0:  # fix the total, keeping sizes in 2..12
        room = np.nonzero(sizes > 2 if excess > 0 else sizes < 12)[0]
        pick = rng.choice(room, size=min(abs(excess), len(room)), replace=False)
        sizes[pick] -= np.sign(excess)
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = centres[labels] + 2.2 * rng.standard_normal((n, dim), dtype=np.float32)
    return x, labels.astype(np.int64)


def inshop_like(queries: int, gallery: int, items: int, dim: int, seed: int = 0):
    """(query [q, dim], query labels, gallery [g, dim], gallery labels): sop_like images of
    ``items`` classes, each item's first image a query and its second in the gallery, the rest
    split at random to give ``queries`` and ``gallery`` images."""
    x, labels = sop_like(queries + gallery, items, dim, seed)
    rng = np.random.default_rng(seed + 1)
    order = np.argsort(labels, kind="stable")
    first = np.r_[True, labels[order][1:] != labels[order][:-1]]
    second = np.r_[False, first[:-1]]
    rest = np.flatnonzero(~first & ~second)
    to_query = np.zeros(len(x), bool)
    to_query[order[first]] = True
    to_query[order[rng.choice(rest, queries - int(first.sum()), replace=False)]] = True
    return x[to_query], labels[to_query], x[~to_query], labels[~to_query]


def cars_like(n: int, classes: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """[n, dim] float32 embeddings, [n] int64 labels; class sizes 59-97 (Cars-196 train) summing to n."""
    rng = np.random.default_rng(seed)
    sizes = np.full(classes, n // classes)
    sizes[: n - int(sizes.sum())] += 1
    for i in range(0, classes - 1, 2):  # spread the sizes pairwise, keeping the total and 59..97
        move = int(rng.integers(0, max(0, min(sizes[i] - 59, 97 - sizes[i + 1])) + 1))
        sizes[i] -= move
        sizes[i + 1] += move
    labels = rng.permutation(np.repeat(np.arange(classes), sizes))
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = centres[labels] + 1.1 * rng.standard_normal((n, dim), dtype=np.float32)
    return x, labels.astype(np.int64)


def catalogue(n: int, queries: int, dim: int = 512, clusters: int = 2000, rank: int = 16, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray]:
    """A catalogue ``[n, dim]`` and ``[queries, dim]`` query float32 embeddings drawn alike: a point is
    its cluster's centre (standard normal), plus a variation of 3 standard deviations in a shared
    ``rank``-dimensional subspace (embeddings vary along few directions within a class), plus
    isotropic noise of 0.1; cluster sizes are heavy-tailed (log-normal weights, as product
    categories are)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)  # [rank, dim] orthonormal
    weights = rng.lognormal(0.0, 1.0, clusters)
    x = centres[rng.choice(clusters, size=n + queries, p=weights / weights.sum())]
    x += (3.0 * rng.standard_normal((n + queries, rank), dtype=np.float32)) @ basis
    x += 0.1 * rng.standard_normal((n + queries, dim), dtype=np.float32)
    return x[:n], x[n:]


# ------------------------------------------------------------------ image folders (SOP format)

def make_photos(out: Path) -> Path:
    """PHOTO_CLASSES x PHOTOS_PER_CLASS 500x500 JPEGs (quality 90, the size of SOP photos) in SOP
    layout under ``out``, cut from scikit-image's colour photographs (random crops, flips and colour
    scaling); returns ``out``. An existing build is kept."""
    import skimage.data as sd
    from PIL import Image

    if (out / "Ebay_train.txt").is_file():
        return out
    bases = [sd.astronaut(), sd.chelsea(), sd.coffee(), sd.rocket(), sd.immunohistochemistry(),
             sd.hubble_deep_field(), sd.retina()]
    rng = np.random.default_rng(0)
    lines = [HEADER]
    for c in range(PHOTO_CLASSES):
        for k in range(PHOTOS_PER_CLASS):
            base = bases[(c * PHOTOS_PER_CLASS + k) % len(bases)]
            h, w = base.shape[:2]
            side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            patch = base[top:top + side, left:left + side].astype(np.float32) * rng.uniform(0.7, 1.1, 3)
            patch = np.clip(patch, 0, 255).astype(np.uint8)[:, ::-1 if rng.random() < 0.5 else 1]
            rel = f"images/{c:03d}/{k}.jpg"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(patch).resize((PHOTO_SIDE, PHOTO_SIDE), Image.BILINEAR).save(out / rel, quality=90)
            lines.append(f"{len(lines)} {c + 1} 1 {rel}")
    (out / "Ebay_test.txt").write_text("\n".join(lines[:1] + lines[1:PHOTOS_PER_CLASS + 1]) + "\n")
    (out / "Ebay_train.txt").write_text("\n".join(lines) + "\n")
    return out


def kanji_root(tmp: Path) -> Path:
    """The demo data of the repository (data/kanji), or a build of KANJI_SMALL_CLASSES
    characters in ``tmp/kanji`` when that is absent."""
    if (REPO / "data" / "kanji" / "Ebay_train.txt").is_file():
        return REPO / "data" / "kanji"
    from fastiaa.data import build_kanji

    return build_kanji(tmp / "kanji", num_classes=KANJI_SMALL_CLASSES)


def write_lists(out: Path, splits: dict[str, list[tuple[int, str]]], images_dir: Path) -> Path:
    """SOP-format Ebay_train.txt / Ebay_test.txt under ``out`` from (class_id, relative path)
    rows, with ``out/images`` linked to ``images_dir``; returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / "images"
    if not link.exists():
        link.symlink_to(images_dir.resolve(), target_is_directory=True)
    for name, rows in splits.items():
        lines = [HEADER] + [f"{i + 1} {c} 1 {p}" for i, (c, p) in enumerate(rows)]
        (out / name).write_text("\n".join(lines) + "\n")
    return out


def read_rows(path: Path) -> list[tuple[int, str]]:
    """(class_id, relative path) rows of a SOP-format list."""
    rows = [line.split() for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(int(class_id), rel) for _, class_id, _, rel in rows]


def kanji_subset(out: Path, classes: int) -> Path:
    """The first ``classes`` train and test classes of the kanji demo (:func:`kanji_root`) as a
    SOP-format root under ``out``."""
    src = kanji_root(out / "build")
    splits = {}
    for name in ("Ebay_train.txt", "Ebay_test.txt"):
        rows = read_rows(src / name)
        keep = set(sorted({c for c, _ in rows})[:classes])
        splits[name] = [(c, p) for c, p in rows if c in keep]
    if any(not p.startswith("images/") for rows in splits.values() for _, p in rows):
        raise ValueError(f"{src}: expected image paths under images/")
    return write_lists(out / "kanji_subset", splits, src / "images")


def sop_shaped(out: Path) -> Path:
    """SOP-shaped split lists (docs/method.md §1 sizes, classes of 2-12 images from
    :func:`sop_like`, rows grouped by class) over the PHOTO_CLASSES x PHOTOS_PER_CLASS JPEGs of
    :func:`make_photos`, reused cyclically."""
    pool_root = make_photos(out / "photos")
    pool = [p for _, p in read_rows(pool_root / "Ebay_train.txt")]
    splits, offset = {}, 0
    for name, (n, classes), seed in (("Ebay_train.txt", SOP_TRAIN, 0), ("Ebay_test.txt", SOP_TEST, 1)):
        _, labels = sop_like(n, classes, 1, seed=seed)
        labels = np.sort(labels)
        splits[name] = [(offset + int(c) + 1, pool[(offset + i) % len(pool)]) for i, c in enumerate(labels)]
        offset += classes
    return write_lists(out / "sop_shaped", splits, pool_root / "images")


# ------------------------------------------------------------------ batches and sampling factors

def balanced_labels(num_classes: int, batch: int, per_class: int, gen):
    """[batch] int64 labels: batch // per_class random classes x per_class images each (the
    balanced sampler's batch, docs/method.md §2)."""
    import torch

    classes = torch.randperm(num_classes, generator=gen)[: batch // per_class]
    return classes.repeat_interleave(per_class)


def sop_lowrank_factor(gen, num_classes: int = SOP_TRAIN[1], num_rows: int = SOP_TRAIN[0], dim: int = 512,
                       neighbors: int = 25):
    """A random fastiaa.kernels.LowRankFactor with SOP's shape: class row counts 2-12 summing to
    about ``num_rows``, each class drawing on its own rows and on ``neighbors`` random classes'
    plus a [dim, dim] global factor (the form of LowRankStatistics.corrected, docs/method.md §5)."""
    import torch

    from fastiaa.kernels import LowRankFactor

    counts = 2 + torch.randint(0, 11, (num_classes,), generator=gen)
    counts = (counts.double() * num_rows / counts.sum()).round().long().clamp(2, 12)
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    rows = 0.05 * torch.randn(int(row_ptr[-1]), dim, generator=gen)
    sources = torch.cat([torch.arange(num_classes)[:, None],
                         torch.randint(0, num_classes, (num_classes, neighbors), generator=gen)], 1)
    length = counts[sources].flatten()
    pair = torch.repeat_interleave(torch.arange(length.numel()), length)
    position = torch.arange(pair.numel()) - (length.cumsum(0) - length)[pair]
    entry_row = row_ptr[sources.flatten()[pair]] + position
    per_class = counts[sources].sum(1)
    glob = torch.linalg.cholesky(torch.eye(dim) * 0.01 + 0.001)
    return LowRankFactor(rows, torch.cat([torch.zeros(1, dtype=torch.int64), per_class.cumsum(0)]), entry_row,
                         torch.rand(entry_row.numel(), generator=gen) * 0.3, glob,
                         torch.rand(num_classes, generator=gen) * 0.3, int(per_class.max()))


# ------------------------------------------------------------------ class statistics

def random_embeddings(labels, dim: int, device, seed: int = 0):
    """[N, dim] float32 standard-normal embeddings on ``device`` for ``labels`` [N] (seeded)."""
    import torch

    gen = torch.Generator(device).manual_seed(seed)
    return torch.randn(len(labels), dim, generator=gen, device=device)


def random_statistics(trainer) -> None:
    """Fold random embeddings of the train set into a ``fastiaa.train.Trainer``'s IAA statistics
    (``trainer.iaa.fold``: statistics and sampling factor), standing in for a refresh."""
    import torch

    labels = torch.from_numpy(np.array(trainer.dataset.train.labels)).to(trainer.device)
    trainer.iaa.fold(random_embeddings(labels, trainer.cfg.model.embedding_size, trainer.device), labels)


def random_covariance(labels, num_classes: int, dim: int, device):
    """[num_classes, dim] diagonal population covariances of the same kind of random embeddings
    as :func:`random_statistics` (what a first fold of them gives, docs/method.md §3), for the
    authors' loop. ``labels``: [N] integer class indices (array or tensor)."""
    import torch

    if not isinstance(labels, torch.Tensor):
        labels = torch.from_numpy(np.array(labels, dtype=np.int64))   # a copy: ImageSet labels are read-only
    labels = labels.to(device, torch.int64)
    z = random_embeddings(labels, dim, device)
    counts = torch.bincount(labels, minlength=num_classes).clamp_min(1)[:, None]
    mean = torch.zeros(num_classes, dim, device=device).index_add_(0, labels, z) / counts
    return torch.zeros(num_classes, dim, device=device).index_add_(0, labels, (z - mean[labels]) ** 2) / counts
