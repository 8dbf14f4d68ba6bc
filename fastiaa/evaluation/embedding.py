"""Embedding passes and evaluation as plain functions of a model, loaders and a device: shared by
the trainer (refreshes, evaluation), ``fastiaa eval`` and anyone's own loop."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from tqdm import tqdm

from fastiaa import distributed
from fastiaa.distributed import World
from fastiaa.errors import NonFiniteError

from .metrics import retrieval_metrics


@torch.no_grad()
def embed(model: torch.nn.Module, loader: Iterable, device: torch.device, amp: torch.dtype | None = None,
          world: World | None = None, desc: str = "embed") -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings of every image a loader yields, in its order, with the model in eval mode.

    Args:
        model: maps a ``Batch.images`` tensor to ``[b, D]`` embeddings.
        loader: iterable of ``fastiaa.pipelines.Batch`` (images on ``device``).
        device: where the embeddings are collected.
        amp: autocast dtype (None: float32).
        world: gather every rank's share in rank order (each rank embeds its shard); None: this
            process's images only.
        desc: progress-bar label (the bar shows on the main rank only).

    Returns:
        ``z [N, D]`` float32 and ``labels [N]`` int64, both on ``device``.

    Raises:
        NonFiniteError: the model produced a NaN or infinite embedding.
    """
    model.eval()
    feats, labels = [], []
    show = world is None or world.is_main
    for batch in tqdm(loader, desc=desc, leave=False, disable=not show, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            feats.append(model(batch.images).float())
        labels.append(batch.labels.to(device))
    z = torch.cat(feats) if feats else torch.zeros(0, 1, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    if world is not None:
        z, y = distributed.all_gather_varsize(z, world), distributed.all_gather_varsize(y, world)
    if not torch.isfinite(z).all():
        raise NonFiniteError(f"non-finite embeddings in the pass {desc!r}")
    return z, y


def evaluate(model: torch.nn.Module, loaders: Mapping[str, Iterable], device: torch.device,
             amp: torch.dtype | None = None, ks=(1, 2, 4, 8), map_at_r: bool = True,
             world: World | None = None, on_embeddings: Callable | None = None) -> dict:
    """Recall@K, MAP@R and R-Precision of ``model`` on the held-out classes (docs/method.md §8).

    Args:
        loaders: ``{"test": loader}`` (query set = reference set: CUB, Cars, SOP) or
            ``{"query": ..., "gallery": ...}`` (In-Shop: queries against the gallery, by item id).
        device: where the model runs and the similarities are computed.
        ks, map_at_r: as :func:`retrieval_metrics`.
        world: under DDP each rank embeds its shard; rank 0 computes the metrics, every rank
            returns them.
        on_embeddings: called on rank 0 with ``(query, query_labels, reference, reference_labels)``
            (reference None when the query set is the reference set), e.g. to draw retrievals.

    Returns:
        the dict of :func:`retrieval_metrics`.
    """
    world = world or World()
    if "query" in loaders:
        q, ql = embed(model, loaders["query"], device, amp, world, "evaluate query")
        g, gl = embed(model, loaders["gallery"], device, amp, world, "evaluate gallery")
        args = (q, ql, g, gl)
    else:
        args = (*embed(model, loaders["test"], device, amp, world, "evaluate"), None, None)
    metrics = None
    if world.is_main:
        if on_embeddings is not None:
            on_embeddings(*args)
        metrics = retrieval_metrics(*args, ks=ks, map_at_r=map_at_r, device=device)
    return distributed.broadcast_object(metrics, world)
