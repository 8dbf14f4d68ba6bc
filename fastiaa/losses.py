"""Pair-based metric-learning losses with IAA's synthetic candidates (Eq. 18-20 of the paper,
docs/method.md §6).

Every loss is called as ``loss(embeddings [B, D], labels [B], synthetic=None | [M, B, D])``
on L2-normalised inputs (cosine similarity = dot product; the losses do not normalise).

Anchors are the B originals. Candidates are the originals followed by the M synthetic
blocks, candidate ``m * B + b`` being block m's copy of original b (block 0 = the
originals). Positive pairs: same label, excluding the anchor's own position in every
block (itself and the samples synthesised from it). Negative pairs: different label.
Similarities are computed in float32 with autocast disabled; everything is vectorised
over anchors with masks. :func:`iaa_pairs` gives the same pair rule as the indices tuple of
pytorch-metric-learning, for using its losses with IAA (the README's example).
"""
from __future__ import annotations

import torch
from torch import nn


def pair_masks(labels: torch.Tensor, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair rule of IAA (Eq. 18-20): ``positive`` and ``negative`` ``[B, blocks · B]`` bool masks
    of anchor b against candidate m·B + j (block m's copy of original j; block 0 = the originals):
    positive when the labels agree and j != b (never the anchor's own copies), negative when they differ.
    """
    b = labels.shape[0]
    candidate_labels = labels.repeat(blocks)
    same = labels.unsqueeze(1) == candidate_labels.unsqueeze(0)
    own = torch.arange(b, device=labels.device).unsqueeze(1) == (
        torch.arange(b * blocks, device=labels.device) % b
    ).unsqueeze(0)
    return same & ~own, ~same


def iaa_pairs(labels: torch.Tensor, num_synthetic: int = 0) -> tuple[torch.Tensor, ...]:
    """The pairs of :func:`pair_masks` as pytorch-metric-learning's indices tuple ``(a1, p, a2, n)``:
    anchors index ``labels [B]``, positives and negatives index the candidates (the originals, then
    ``num_synthetic`` synthetic blocks of B), passed as ``ref_emb`` with ``ref_labels =
    labels.repeat(num_synthetic + 1)``. All int64 on the labels' device.
    """
    positive, negative = pair_masks(labels, num_synthetic + 1)
    a1, p = torch.nonzero(positive, as_tuple=True)
    a2, n = torch.nonzero(negative, as_tuple=True)
    return a1, p, a2, n


def pair_similarities(
    embeddings: torch.Tensor, labels: torch.Tensor, synthetic: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Anchor-candidate similarities and pair masks (Eq. 18-20, :func:`pair_masks`).

    Args:
        embeddings: ``[B, D]`` L2-normalised originals (the anchors).
        labels: ``[B]`` integer labels.
        synthetic: None or ``[M, B, D]`` L2-normalised synthetic embeddings, block m row b
            synthesised from original b.

    Returns:
        ``sim [B, (M+1)B]`` float32, ``positive`` and ``negative`` ``[B, (M+1)B]`` bool masks.

    Raises:
        ValueError: shapes that do not fit together.
    """
    if embeddings.dim() != 2 or labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"expected embeddings [B, D] and labels [B], got {list(embeddings.shape)} and {list(labels.shape)}"
        )
    if synthetic is not None and (synthetic.dim() != 3 or synthetic.shape[1:] != embeddings.shape):
        raise ValueError(
            f"synthetic must be [M, {embeddings.shape[0]}, {embeddings.shape[1]}] (M samples per original), "
            f"got {list(synthetic.shape)}"
        )
    blocks = 1 if synthetic is None else synthetic.shape[0] + 1
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        anchors = embeddings.float()
        candidates = anchors
        if synthetic is not None:
            candidates = torch.cat([anchors, synthetic.float().reshape(-1, anchors.shape[1])])
        sim = anchors @ candidates.T
    return (sim, *pair_masks(labels, blocks))


def _log1p_sum_exp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log(1 + Σ_j mask·exp(x_j)) per row, stable (logsumexp with a zero term)."""
    masked = x.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(torch.cat([torch.zeros_like(x[:, :1]), masked], dim=1), dim=1)


class MultiSimilarityLoss(nn.Module):
    """Multi-Similarity loss with the official mining (docs/method.md §6; Wang et al., CVPR 2019).

    Per anchor: positives with s >= 1 - epsilon are dropped; a negative is kept if
    s + margin > min positive s, a positive if s - margin < max negative s (both over the
    un-mined sets); loss = (1/α) log(1 + Σ_pos e^{-α(s - λ)}) + (1/β) log(1 + Σ_neg e^{β(s - λ)}).
    Following the official implementation, an anchor contributes 0 when it has no positive
    or no negative before mining, or no kept positive or no kept negative after mining.
    The sum over anchors is divided by B.

    Args:
        threshold: λ (0.5). scale_pos: α (2). scale_neg: β (40).
        margin: the mining margin (0.1); None: no mining, every pair of :func:`pair_masks` is
            weighted (what pytorch-metric-learning's MultiSimilarityLoss computes without a miner).
        epsilon: positives with s >= 1 - epsilon are dropped (1e-5).
    """

    def __init__(self, threshold: float = 0.5, margin: float | None = 0.1, scale_pos: float = 2.0,
                 scale_neg: float = 40.0, epsilon: float = 1e-5) -> None:
        super().__init__()
        self.threshold, self.margin = threshold, margin
        self.scale_pos, self.scale_neg, self.epsilon = scale_pos, scale_neg, epsilon

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, synthetic: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar float32 loss; see the class docstring and :func:`pair_similarities`."""
        sim, positive, negative = pair_similarities(embeddings, labels, synthetic)
        positive = positive & (sim < 1 - self.epsilon)
        keep_pos, keep_neg = positive, negative
        if self.margin is not None:  # scalars, not host tensors: nothing is copied to the device
            min_pos = torch.where(positive, sim, float("inf")).amin(1, keepdim=True)
            max_neg = torch.where(negative, sim, float("-inf")).amax(1, keepdim=True)
            keep_neg = negative & (sim + self.margin > min_pos)
            keep_pos = positive & (sim - self.margin < max_neg)
        active = keep_pos.any(1) & keep_neg.any(1)
        pos_loss = _log1p_sum_exp(-self.scale_pos * (sim - self.threshold), keep_pos) / self.scale_pos
        neg_loss = _log1p_sum_exp(self.scale_neg * (sim - self.threshold), keep_neg) / self.scale_neg
        per_anchor = torch.where(active, pos_loss + neg_loss, torch.zeros_like(pos_loss))
        return per_anchor.sum() / embeddings.shape[0]


class ContrastiveLoss(nn.Module):
    """Contrastive loss in similarity form with the official margins (docs/method.md §6).

    Σ over positive pairs with s < pos_margin of (pos_margin - s) + Σ over negative pairs
    with s > neg_margin of (s - neg_margin), divided by B.

    Args:
        pos_margin: 0.8. neg_margin: 0.5.
    """

    def __init__(self, pos_margin: float = 0.8, neg_margin: float = 0.5) -> None:
        super().__init__()
        self.pos_margin, self.neg_margin = pos_margin, neg_margin

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, synthetic: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar float32 loss; see the class docstring and :func:`pair_similarities`."""
        sim, positive, negative = pair_similarities(embeddings, labels, synthetic)
        pos = torch.where(positive, (self.pos_margin - sim).clamp_min(0), torch.zeros_like(sim))
        neg = torch.where(negative, (sim - self.neg_margin).clamp_min(0), torch.zeros_like(sim))
        return (pos.sum() + neg.sum()) / embeddings.shape[0]


class TripletLoss(nn.Module):
    """Triplet loss with every positive and the hardest negative of the anchor (docs/method.md §6).

    For each anchor a with at least one negative, each positive p contributes
    max(0, s(a, n*) - s(a, p) + margin), n* the most similar negative among all
    candidates; the sum is divided by B (the convention of the other two losses).

    Args:
        margin: hinge margin in cosine-similarity units (default 0.1).
    """

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        self.margin = margin

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, synthetic: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Scalar float32 loss; see the class docstring and :func:`pair_similarities`."""
        sim, positive, negative = pair_similarities(embeddings, labels, synthetic)
        hardest = torch.where(negative, sim, torch.full_like(sim, float("-inf"))).amax(1, keepdim=True)
        usable = positive & negative.any(1, keepdim=True)
        hinge = (hardest - sim + self.margin).clamp_min(0)
        return torch.where(usable, hinge, torch.zeros_like(hinge)).sum() / embeddings.shape[0]
