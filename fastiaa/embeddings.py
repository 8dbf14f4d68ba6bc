"""Embeddings files (``fastiaa embed``): images embedded by a trained model through the evaluation
pipeline of its run, saved as ``FILE.npy`` (``[N, D]`` float32 or float16) beside the sidecar
``FILE.json`` (image paths, labels, the images skipped and the model's fingerprint, which ties an
index to the model whose embeddings it holds; docs/architecture.md, "Deployment")."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fastiaa import checkpoint, registry, runtime
from fastiaa.data import (
    IMAGE_EXTENSIONS, DatasetError, DatasetNotFoundError, ImageSet, check_images, list_images, read_csv_rows,
    resize_mode,
)
from fastiaa.errors import UnreadableImageError
from fastiaa.evaluation import embed
from fastiaa.pipelines import build_cache

FORMAT = "fastiaa-embeddings/1"
DTYPES = registry.EMBEDDING_DTYPES


def sidecar(path: str | os.PathLike) -> Path:
    """The sidecar of an embeddings file: ``FILE.npy`` -> ``FILE.json``."""
    return Path(path).with_suffix(".json")


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Embeddings of images with what they are.

    Attributes:
        vectors: ``[N, D]`` float32 or float16, un-normalised (as the model outputs them).
        paths, labels: ``[N]`` absolute image paths and their labels ("" when unlabelled).
        model: the fingerprint of the model (:func:`fingerprint`).
        skipped: ``(path, error)`` of every input image that could not be read.

    Raises:
        ValueError: lengths that do not match ``vectors``.
    """

    vectors: np.ndarray
    paths: tuple[str, ...]
    labels: tuple[str, ...]
    model: dict
    skipped: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2 or not len(self.vectors) == len(self.paths) == len(self.labels):
            raise ValueError(f"embeddings {self.vectors.shape} do not match {len(self.paths)} paths and "
                             f"{len(self.labels)} labels")

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def save(self, path: str | os.PathLike, dtype: str = "float32") -> None:
        """Write ``path`` (.npy, ``dtype``) and its sidecar, each atomically.

        Raises:
            ValueError: ``path`` does not end in .npy, or an unknown dtype.
        """
        path = Path(path)
        if path.suffix != ".npy" or dtype not in DTYPES:
            raise ValueError(f"embeddings are written as FILE.npy in {' or '.join(DTYPES)}, got {path} and {dtype}")
        meta = {"format": FORMAT, "count": len(self.paths), "dim": self.dim, "dtype": dtype, "model": self.model,
                "paths": list(self.paths), "labels": list(self.labels),
                "skipped": [{"path": p, "error": e} for p, e in self.skipped]}
        checkpoint.atomic_write(path, lambda f: np.save(f, self.vectors.astype(dtype)))
        checkpoint.atomic_write_text(sidecar(path), json.dumps(meta, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Embeddings":
        """Read an embeddings file written by :meth:`save`.

        Raises:
            FileNotFoundError: the file or its sidecar is missing. ValueError: they do not belong
            together, or the sidecar is not fastiaa's.
        """
        path, side = Path(path), sidecar(path)
        for needed in (path, side):
            if not needed.is_file():
                raise FileNotFoundError(f"no {needed}: `fastiaa embed --out {path}` writes {path.name} and {side.name}")
        try:
            meta = json.loads(side.read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
            vectors = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{path} / {side.name} are not embeddings written by `fastiaa embed` ({error})") from None
        if vectors.shape != (meta["count"], meta["dim"]):
            raise ValueError(f"{path} holds {vectors.shape} but {side.name} describes {meta['count']} x {meta['dim']}: "
                             "they come from different runs; run `fastiaa embed` again")
        return cls(vectors, tuple(meta["paths"]), tuple(meta["labels"]), meta["model"],
                   tuple((s["path"], s["error"]) for s in meta["skipped"]))


def fingerprint(state: dict, cfg, resize: str) -> dict:
    """What makes a model's embeddings comparable: backbone, dimension, input geometry (the eval
    resize of its dataset, ``resize``) and the SHA-256 of its weights (a checkpoint ``state``)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(state["model"].items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return {"backbone": cfg.model.backbone, "embedding_size": cfg.model.embedding_size, "resize": resize,
            "resize_size": cfg.data.resize_size, "image_size": cfg.data.image_size, "weights": digest.hexdigest()[:16]}


def require_same_model(held: dict, held_name: str, model: dict, model_name: str) -> None:
    """Refuse embeddings of one model (``held``, e.g. an index) next to another (``model``).

    Raises:
        ValueError: another dimension, or another model (weights, backbone or input geometry).
    """
    if held.get("embedding_size") != model["embedding_size"]:
        raise ValueError(f"{held_name} holds {held.get('embedding_size')}-d embeddings but {model_name} gives "
                         f"{model['embedding_size']}-d ones: embed the images with one model (fastiaa embed) "
                         "and build the index from those")
    differ = [f"{key} {held.get(key)} vs {value}" for key, value in model.items() if held.get(key) != value]
    if differ:
        raise ValueError(f"{held_name} holds the embeddings of another model than {model_name} ({'; '.join(differ)}): "
                         "embed the images with this model (fastiaa embed) and build the index again")


def image_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(paths, labels)`` of image inputs, in the order given. A folder: every image below it
    (``fastiaa.data.list_images``), labelled by its folder relative to the one given ("" at its
    top), so class folders give class labels; a ``.csv``: its rows (the csv dataset format, only
    ``path`` required), labelled by their ``label``; an image file: itself, unlabelled.

    Raises:
        FileNotFoundError: an input that does not exist. DatasetError: a folder or CSV that
        does not follow its format. ValueError: a file that is neither an image nor a CSV.
    """
    paths, labels = [], []
    for item in inputs:
        item = os.path.abspath(os.path.expanduser(item))
        if os.path.isdir(item):
            for path in list_images(item):
                folder = os.path.relpath(os.path.dirname(path), item)
                paths.append(path)
                labels.append("" if folder == "." else folder.replace(os.sep, "/"))
        elif item.lower().endswith(".csv"):
            try:
                rows = read_csv_rows(item, required=("path",))
            except DatasetNotFoundError:
                raise FileNotFoundError(f"no CSV file {item}") from None
            paths += [r.path for r in rows]
            labels += [r.label for r in rows]
        elif not os.path.exists(item):
            raise FileNotFoundError(f"no image, folder or CSV at {item}")
        elif item.lower().endswith(IMAGE_EXTENSIONS):
            paths.append(item)
            labels.append("")
        else:
            raise ValueError(f"{item} is neither an image (names end in {', '.join(IMAGE_EXTENSIONS)}), "
                             "a folder of images nor a .csv list of them")
    return paths, labels


class Embedder:
    """The model of a ``fastiaa train`` checkpoint with the evaluation pipeline of its run (the
    loader, batch size, resize and crop of ``fastiaa eval``, docs/method.md §2), on ``device``.

    ``loader``, ``batch_size`` and ``workers`` override the run's (None: keep them). ``cache_dir``:
    decode the images once into the persistent cache there (pipelines.cache; the test split's
    cache of a training run with the same ``--cache-dir`` serves the same images), ``cache``:
    ``"device"`` keeps it in GPU memory instead of host memory.

    Raises:
        FileNotFoundError: no checkpoint. ValueError: not a fastiaa checkpoint, an unknown
        backbone or device.
    """

    def __init__(self, checkpoint_path: str | os.PathLike, device: str = "auto", loader: str | None = None,
                 batch_size: int | None = None, workers: int | None = None, cache: str = "off",
                 cache_dir: str | None = None):
        state = checkpoint.load(checkpoint_path)
        overrides = {k: v for k, v in (("loader", loader), ("eval_batch", batch_size), ("workers", workers))
                     if v is not None}
        self.name = str(checkpoint_path)
        self.cfg = checkpoint.config_of(state).replace(pretrained=False, device=device, **overrides)
        self.device = runtime.resolve_device(self.cfg.runtime.device)
        self.amp = runtime.autocast_dtype(self.cfg.runtime.amp, self.device)
        self.resize = resize_mode(self.cfg.data.dataset)
        self.model = runtime.checkpoint_model(state, self.cfg, self.device)
        self.fingerprint = fingerprint(state, self.cfg, self.resize)
        self.cache, self.cache_dir = cache, cache_dir

    def embed(self, paths: Sequence[str], labels: Sequence[str] | None = None, strict: bool = False,
              desc: str = "embed") -> Embeddings:
        """Embeddings of the images ``paths`` (labels: "" when None), in order.

        An image that cannot be read stops the pass; then every image is decoded with PIL
        (``fastiaa.data.check_images``), the unreadable ones are left out and listed in
        ``skipped``, and the rest is embedded again. ``strict``: raise instead.

        Raises:
            UnreadableImageError: with ``strict``, the first image the pipeline cannot read.
            ValueError: no image, or none readable.
        """
        paths, labels = list(paths), list(labels) if labels is not None else [""] * len(paths)
        if not paths:
            raise ValueError("no image to embed")
        try:
            return Embeddings(self._pass(paths, desc), tuple(paths), tuple(labels), self.fingerprint)
        except UnreadableImageError as error:
            if strict:
                raise
            skipped = check_images(paths)
            if error.path not in {p for p, _ in skipped}:  # the pipeline's decoder refuses what PIL reads
                skipped.append((error.path, str(error)))
        except DatasetError as error:  # a cache's decode pass lists every unreadable image at once
            if strict or not hasattr(error, "bad"):
                raise
            skipped = list(error.bad)
        bad = {p for p, _ in skipped}
        keep = [i for i, p in enumerate(paths) if p not in bad]
        if not keep:
            raise ValueError(f"none of the {len(paths)} images can be read (first: {skipped[0][0]}: {skipped[0][1]})")
        paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        return Embeddings(self._pass(paths, desc), tuple(paths), tuple(labels), self.fingerprint, tuple(skipped))

    def _pass(self, paths: list[str], desc: str) -> np.ndarray:
        images = ImageSet(tuple(paths), np.zeros(len(paths), np.int64), ("",))
        cache = None
        if self.cache != "off" or self.cache_dir is not None:
            geometry = runtime.loader_geometry(self.cfg, self.resize, self.model.input_space, self.device)
            cache = build_cache(self.cfg.data.loader, images, "crop", where="device" if self.cache == "device" else "ram",
                                cache_dir=self.cache_dir, **geometry)
        loader = runtime.eval_loader(self.cfg, images, self.resize, self.model.input_space, self.device, cache)
        z, _ = embed(self.model, loader, self.device, self.amp, desc=desc)
        return z.cpu().numpy()
