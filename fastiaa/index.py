"""Retrieval indexes (``fastiaa index``, ``fastiaa search``): a faiss index over L2-normalised
embeddings, searched by inner product, i.e. cosine similarity (docs/method.md §8), kept in one file
with the paths, labels and model fingerprint of what it holds (docs/architecture.md, "Deployment").

Kinds: ``flat`` (``IndexFlatIP``, exact: the default and the reference), ``hnsw``
(``IndexHNSWFlat``, a neighbour graph) and ``ivf`` (``IndexIVFFlat``, k-means cells), both
approximate, for large catalogues; bench/bench_index.py measures their build time, queries/s and
Recall@10 against the exact answer.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from fastiaa import checkpoint, registry
from fastiaa.embeddings import Embeddings
from fastiaa.report import Hit, Retrieval

KINDS = registry.INDEX_KINDS
FORMAT = "fastiaa-index/1"


@dataclass(frozen=True)
class IndexSettings:
    """How an index is built. ``kind``: one of ``KINDS``. HNSW: ``hnsw_m`` links per vector,
    ``ef_construction`` / ``ef_search`` candidate lists while building / searching. IVF: ``nlist``
    cells (None: 4 sqrt(N), at most N / 39, faiss's least training points per cell), ``nprobe``
    cells visited per query."""

    kind: str = "flat"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    nlist: int | None = None
    nprobe: int = 16

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        sizes = {"hnsw_m": self.hnsw_m, "ef_construction": self.ef_construction, "ef_search": self.ef_search,
                 "nprobe": self.nprobe, "nlist": self.nlist or 1}
        bad = [f"{name} {value}" for name, value in sizes.items() if value < 1]
        if bad:
            raise ValueError(f"index settings must be >= 1: {', '.join(bad)}")


def normalized(vectors: np.ndarray) -> np.ndarray:
    """``[N, D]`` float vectors -> float32 C-contiguous rows of unit length (zero rows stay zero)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny))


def _faiss_index(x: np.ndarray, settings: IndexSettings) -> faiss.Index:
    n, dim = x.shape
    if settings.kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif settings.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        index.hnsw.efSearch = settings.ef_search
    else:
        nlist = settings.nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
        if nlist > n:
            raise ValueError(f"--nlist {nlist} is more than the {n} vectors to index")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = min(settings.nprobe, nlist)
    index.add(x)
    return index


class RetrievalIndex:
    """A faiss index of embeddings with their ``paths``, ``labels`` and the fingerprint ``model`` of the
    model that made them (``fastiaa.embeddings.fingerprint``; {} when unknown)."""

    def __init__(self, index: faiss.Index, paths, labels, model: dict, settings: IndexSettings):
        self.index, self.paths, self.labels = index, tuple(paths), tuple(labels)
        self.model, self.settings = model, settings

    @classmethod
    def build(cls, embeddings: Embeddings, settings: IndexSettings = IndexSettings()) -> "RetrievalIndex":
        """Index ``embeddings`` (normalised here); ``settings`` choose the kind.

        Raises:
            ValueError: no embeddings, a non-finite one, or IVF cells that outnumber them.
        """
        if len(embeddings.paths) == 0:
            raise ValueError("no embeddings to index")
        bad = np.flatnonzero(~np.isfinite(embeddings.vectors).all(axis=1))
        if len(bad):
            raise ValueError(f"{len(bad)} embedding(s) hold NaN or Inf (the first of {embeddings.paths[bad[0]]}): "
                             "embed those images again with `fastiaa embed`")
        return cls(_faiss_index(normalized(embeddings.vectors), settings), embeddings.paths, embeddings.labels,
                   embeddings.model, settings)

    def __len__(self) -> int:
        return self.index.ntotal

    def set_search_width(self, ef_search: int | None = None, nprobe: int | None = None) -> None:
        """Change how widely an approximate index searches (HNSW ``ef_search``, IVF ``nprobe``; the
        flat index ignores both): wider is slower and nearer the exact answer. Saved with the index.

        Raises:
            ValueError: a width < 1.
        """
        changes = {k: v for k, v in (("ef_search", ef_search), ("nprobe", nprobe)) if v is not None}
        self.settings = dataclasses.replace(self.settings, **changes)
        if self.settings.kind == "hnsw":
            self.index.hnsw.efSearch = self.settings.ef_search
        elif self.settings.kind == "ivf":
            self.index.nprobe = min(self.settings.nprobe, self.index.nlist)

    @property
    def dim(self) -> int:
        return self.index.d

    def save(self, path: str | os.PathLike) -> None:
        """Write the index and what it holds to one file (numpy ``.npz`` container), atomically."""
        meta = {"format": FORMAT, "settings": asdict(self.settings), "model": self.model,
                "paths": list(self.paths), "labels": list(self.labels)}
        blob = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        checkpoint.atomic_write(path, lambda f: np.savez(f, index=faiss.serialize_index(self.index), meta=blob))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "RetrievalIndex":
        """Read an index written by :meth:`save`.

        Raises:
            FileNotFoundError: no such file. ValueError: not an index written by fastiaa.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no index at {path}: build one with `fastiaa index build`")
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(stored["meta"].tobytes())
                index = faiss.deserialize_index(stored["index"])
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}")
        except (ValueError, KeyError, OSError, RuntimeError) as error:
            raise ValueError(f"{path} is not an index written by `fastiaa index build` ({error})") from None
        return cls(index, meta["paths"], meta["labels"], meta["model"], IndexSettings(**meta["settings"]))

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed items of each query by cosine similarity.

        Args:
            queries: ``[n, D]`` embeddings (normalised here).
            exclude: ``[n]`` int64 position of an item each query must not retrieve (itself), -1: none.

        Returns:
            ``similarities [n, k]`` float32 (decreasing) and ``ids [n, k]`` int64 positions in
            ``paths``; -1 where an approximate index finds fewer than ``k``.

        Raises:
            ValueError: queries of another dimension, or k < 1.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {queries.shape} for an index of {self.dim}-d embeddings")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        extra = int(exclude is not None)
        similarities, ids = self.index.search(normalized(queries), k + extra)
        if exclude is not None:  # drop the excluded item, or the last one where it was not found
            order = np.argsort(ids == np.asarray(exclude)[:, None], axis=1, kind="stable")[:, :k]
            similarities, ids = np.take_along_axis(similarities, order, 1), np.take_along_axis(ids, order, 1)
        return similarities, ids

    def retrievals(self, queries: np.ndarray, paths, labels, k: int, exclude: np.ndarray | None = None
                   ) -> list[Retrieval]:
        """:meth:`search` as :class:`Retrieval` records for queries with ``paths`` and ``labels``."""
        similarities, ids = self.search(queries, k, exclude)
        return [Retrieval(path, label, tuple(Hit(self.paths[i], self.labels[i], float(s))
                                             for s, i in zip(row_s, row_i) if i >= 0))
                for path, label, row_s, row_i in zip(paths, labels, similarities, ids)]

    def recall(self, queries: Embeddings, ks=(1, 2, 4, 8)) -> dict:
        """Recall@K of labelled ``queries`` against the index (docs/method.md §8): the share of queries
        with an item of their label among their K nearest. A query that is itself indexed (same
        path) never retrieves itself, so the embeddings an index was built from give the
        leave-one-out Recall@K of ``fastiaa eval``.

        Raises:
            ValueError: unlabelled images, or queries of another dimension.
        """
        labels, query_labels = np.array(self.labels, dtype=str), np.array(queries.labels, dtype=str)
        if (labels == "").any() or (query_labels == "").any():
            raise ValueError("Recall@K needs labelled images: embed class folders or a CSV with a label column")
        position = {path: i for i, path in enumerate(self.paths)}
        exclude = np.array([position.get(path, -1) for path in queries.paths], dtype=np.int64)
        _, ids = self.search(queries.vectors, max(ks), exclude)
        hit = (ids >= 0) & (labels[ids] == query_labels[:, None])
        return {**{f"recall@{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks}, "num_queries": len(ids)}


def results_table(retrievals: list[Retrieval], fmt: str) -> str:
    """Retrievals as text: ``"csv"`` (query, query_label, rank, path, label, similarity), ``"json"``
    (a list of {query, query_label, neighbours: [{rank, path, label, similarity}]}) or ``"text"``."""
    if fmt == "json":
        return json.dumps([{"query": r.path, "query_label": r.label, "neighbours": [
            {"rank": rank, "path": h.path, "label": h.label, "similarity": round(h.similarity, 6)}
            for rank, h in enumerate(r.hits, 1)]} for r in retrievals], indent=1) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["query", "query_label", "rank", "path", "label", "similarity"])
        writer.writerows((r.path, r.label, rank, h.path, h.label, f"{h.similarity:.6f}")
                         for r in retrievals for rank, h in enumerate(r.hits, 1))
        return out.getvalue()
    lines = []
    for r in retrievals:
        lines.append(r.path + (f"  (label {r.label})" if r.label else ""))
        lines += [f"  {rank:3d}  {h.similarity:.4f}  {h.label or '-'}  {h.path}" for rank, h in enumerate(r.hits, 1)]
    return "\n".join(lines) + "\n"
