"""Decode once: the uint8 images of one split, kept after the loader's first stage.

A split's images go through two stages in every loader (docs/architecture.md, "Cache"):

    stage 1, the same on every pass:  decode -> resize (256 x 256, or the shorter side to 256)
                                      [-> centre crop, for a split that is only evaluated]
    stage 2, what varies per pass:    train: the crop window of the epoch, resized to crop x crop,
                                      and the flip; eval: the centre crop; then normalisation

An :class:`ImageCache` holds stage 1's output for every image of a split, ``kind="resized"`` (the
images train epochs crop from; a refresh takes its centre crops from them too) or ``kind="crop"``
(the final centre crops). It is filled in one decode pass by the loader itself (PIL or DALI, so a
cached pass applies exactly the operations of an uncached one to exactly the same uint8 pixels),
and the loaders run stage 2 from it. Images of different sizes (the shorter-side resize) are
packed end to end in one flat buffer, with their offsets and shapes: no padding.

Where it lives: ``ram`` (host memory, pinned when the model runs on a GPU), ``device`` (GPU
memory), or a file under ``cache_dir`` mapped into memory (:func:`open_or_build`): written once,
atomically, keyed by the split's files (paths, sizes, modification times) and the stage-1 settings,
checked (size and a CRC-32 per image) before it is used; a stale, corrupt or truncated file is
rebuilt, never read. Processes that map one file share its pages (one copy per node under DDP).
"""
from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .core import image_size, read_bytes, resized_shape

KINDS = ("resized", "crop")
WHERE = ("off", "auto", "ram", "device")
FORMAT = 1   # bump when the file layout changes: older files are rebuilt


@dataclass(frozen=True)
class Layout:
    """Where each image of a split sits in the flat buffer: ``shapes [N, 2]`` (h, w) int64 and
    ``offsets [N + 1]`` int64 byte offsets (image i is ``buffer[offsets[i]:offsets[i + 1]]``, HWC)."""

    shapes: np.ndarray
    offsets: np.ndarray

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer the layout starts at 0 in (a part of a split starts further on)."""
        return int(self.offsets[-1])


def layout(paths, kind: str, resize: str, resize_size: int, crop: int) -> Layout:
    """The stage-1 shape of every image: ``crop x crop`` for ``kind="crop"``; for ``"resized"``,
    ``resize_size`` square or, for the shorter-side resize, computed from each file's header
    (a header read per file, no decoding).

    Raises:
        OSError: a file is missing or its header unreadable (the message names it).
    """
    if kind not in KINDS:
        raise ValueError(f"cache kind must be one of {KINDS}, got {kind!r}")
    n = len(paths)
    if kind == "crop":
        shapes = np.full((n, 2), crop, np.int64)
    elif resize == "square":
        shapes = np.full((n, 2), resize_size, np.int64)
    else:
        sizes = np.array([image_size(p, read_bytes(p)) for p in paths], np.int64).reshape(n, 2)
        shapes = np.stack(resized_shape(sizes[:, 0], sizes[:, 1], resize, resize_size), 1)
    offsets = np.concatenate([[0], np.cumsum(shapes[:, 0] * shapes[:, 1] * 3)]).astype(np.int64)
    return Layout(shapes, offsets)


class ImageCache:
    """Stage-1 uint8 images of one split (module doc).

    Args:
        layout: where each image sits.
        storage: ``[layout.nbytes]`` uint8 tensor (host, pinned host, a mapped file, or CUDA).
        kind: ``"resized"`` or ``"crop"``.
        files: the data and metadata files of a cache mapped from disk (else empty).
    """

    def __init__(self, layout: Layout, storage: torch.Tensor, kind: str, files: tuple[Path, ...] = ()) -> None:
        self.layout, self.storage, self.kind, self.files = layout, storage, kind, files

    def __len__(self) -> int:
        return len(self.layout.shapes)

    @property
    def device(self) -> torch.device:
        return self.storage.device

    def part(self, images: slice) -> "ImageCache":
        """The cache of a contiguous part of the split (the same storage, no copy)."""
        lay = Layout(self.layout.shapes[images], self.layout.offsets[images.start:images.stop + 1])
        return ImageCache(lay, self.storage, self.kind)

    def image(self, i: int) -> torch.Tensor:
        """Image ``i`` as a ``[h, w, 3]`` uint8 view (no copy)."""
        h, w = (int(v) for v in self.layout.shapes[i])
        start = int(self.layout.offsets[i])
        return self.storage[start:start + h * w * 3].view(h, w, 3)

    def crops(self, indices, top: np.ndarray, left: np.ndarray, size: int) -> torch.Tensor:
        """``[b, size, size, 3]`` uint8: the ``size`` window at (top, left) of each image (a new tensor)."""
        return torch.stack([self.image(int(i))[int(t):int(t) + size, int(x):int(x) + size]
                            for i, t, x in zip(indices, top, left)])

    def write(self, i: int, pixels) -> None:
        """Store image ``i`` (``[h, w, 3]`` uint8 array or tensor of the planned shape)."""
        self.image(i).copy_(torch.as_tensor(np.ascontiguousarray(pixels)))


def _key(paths, kind: str, settings: dict) -> str:
    """Hash of what the cached pixels depend on: the files (paths, sizes, modification times),
    the kind and the stage-1 settings (loader kind, resize, crop, channel order)."""
    digest = hashlib.sha256(json.dumps({"format": FORMAT, "kind": kind, **settings}, sort_keys=True).encode())
    for path in paths:
        st = os.stat(path)
        digest.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def _checksums(cache: ImageCache) -> list[int]:
    data = cache.storage.numpy()
    return [zlib.crc32(data[s:e]) for s, e in zip(cache.layout.offsets[:-1], cache.layout.offsets[1:])]


def open_or_build(cache_dir, paths, kind: str, settings: dict, lay: Layout, fill, say=print) -> ImageCache:
    """The split's cache file under ``cache_dir``: mapped if it exists and checks out, else built
    with ``fill(cache)`` (the decode pass) into a temporary file and renamed into place.

    A file is used only when its metadata has this key, its size is the layout's and every image's
    CRC-32 matches; anything else (another dataset version, a killed build, a flipped byte) is
    rebuilt with a one-line note through ``say``.
    """
    folder = Path(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = _key(paths, kind, settings)
    data, meta = folder / f"{key}.{kind}.u8", folder / f"{key}.{kind}.json"
    if data.is_file() and meta.is_file():
        problem = _check(data, meta, key, lay)
        if problem is None:
            return ImageCache(lay, _map(data, lay), kind, (data, meta))
        say(f"cache {data}: {problem}; rebuilding it")
    for stale in (data, meta):
        stale.unlink(missing_ok=True)
    tmp = folder / f".{key}.{kind}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.truncate(lay.nbytes)
        cache = ImageCache(lay, torch.from_file(str(tmp), shared=True, size=lay.nbytes, dtype=torch.uint8), kind)
        fill(cache)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        record = {"key": key, "kind": kind, "nbytes": lay.nbytes, "shapes": lay.shapes.tolist(),
                  "crc32": _checksums(cache)}
        os.replace(tmp, data)
        meta_tmp = meta.with_suffix(f".{os.getpid()}.tmp")
        meta_tmp.write_text(json.dumps(record))
        os.replace(meta_tmp, meta)   # last: a data file without its metadata is never used
    finally:
        tmp.unlink(missing_ok=True)
    return ImageCache(lay, _map(data, lay), kind, (data, meta))


def _map(data: Path, lay: Layout) -> torch.Tensor:
    """The file as a read-mostly uint8 tensor (a private mapping: pages shared with other readers)."""
    return torch.from_file(str(data), shared=False, size=lay.nbytes, dtype=torch.uint8)


def _check(data: Path, meta: Path, key: str, lay: Layout) -> str | None:
    """None when the cache file can be used, else what is wrong with it."""
    try:
        record = json.loads(meta.read_text())
    except (OSError, ValueError):
        return "unreadable metadata"
    if record.get("key") != key or record.get("nbytes") != lay.nbytes or record.get("shapes") != lay.shapes.tolist():
        return "written for other files or settings"
    if data.stat().st_size != lay.nbytes:
        return f"truncated ({data.stat().st_size} of {lay.nbytes} bytes)"
    cache = ImageCache(lay, _map(data, lay), "check")
    if _checksums(cache) != record.get("crc32"):
        return "corrupt (checksum mismatch)"
    return None


def allocate(lay: Layout, kind: str, where: str, device: torch.device) -> ImageCache:
    """An empty cache in host memory (``ram``; pinned when ``device`` is CUDA) or on ``device``."""
    if where == "device":
        storage = torch.empty(lay.nbytes, dtype=torch.uint8, device=device)
    else:
        storage = torch.empty(lay.nbytes, dtype=torch.uint8, pin_memory=device.type == "cuda")
    return ImageCache(lay, storage, kind)


def free_bytes(where: str, device: torch.device) -> int:
    """Memory free for a cache: the GPU's free memory (``device``) or the host's MemAvailable."""
    if where == "device":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as info:
        for line in info:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def choose(where: str, nbytes: int, device: torch.device, budget_gib: float | None) -> tuple[str, str]:
    """Resolve ``--cache`` for ``nbytes`` of images: (``"device" | "ram" | "off"``, a one-line note).

    ``auto``: the GPU when the model runs on one and the images fit its budget, else host memory
    when they fit its budget, else off. An explicit ``device`` or ``ram`` that does not fit falls
    back (device -> ram -> off) instead of running out of memory. The budget is ``budget_gib``,
    or half of the free memory of that place.

    Raises:
        ValueError: unknown ``where``, or ``device`` without a CUDA device.
    """
    if where not in WHERE:
        raise ValueError(f"--cache must be one of {', '.join(WHERE)}, got {where!r}")
    if where == "off":
        return "off", "cache: off (--cache off)"
    if where == "device" and device.type != "cuda":
        raise ValueError("--cache device keeps images in GPU memory: use it with a CUDA --device, or --cache ram")
    order = {"auto": ("device", "ram") if device.type == "cuda" else ("ram",), "device": ("device", "ram"),
             "ram": ("ram",)}[where]
    gib = nbytes / 2**30
    for place in order:
        budget = budget_gib * 2**30 if budget_gib is not None else free_bytes(place, device) / 2
        if nbytes <= budget:
            where_text = "GPU memory" if place == "device" else "host memory"
            return place, f"cache: {gib:.2f} GiB of decoded images in {where_text}"
    return "off", (f"cache: off ({gib:.2f} GiB of decoded images do not fit the "
                   f"{'--cache-gib ' + str(budget_gib) if budget_gib is not None else 'free memory'})")
