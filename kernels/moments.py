"""Per-class moments (spec IAA.md §3, Eq. 7-8): count, mean and centred second moment.

Deterministic by construction: the rows are sorted by label once (stable sort), then one
Triton program per (class, feature block) reduces its class's contiguous segment in two
passes (mean first, then centred squares), with float32 accumulators and no atomics.
"""
from __future__ import annotations

import torch

from ._dispatch import tl, triton, use_triton


def _segments(labels: torch.Tensor, num_classes: int):
    """Sort rows by label: (order [N] int64, count [C] int64, start [C] int64).

    Raises ValueError when a label is outside ``0..num_classes-1``.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be a 1-D int64 tensor [N], got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 class indices, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and bool(labels.min() < 0):
        raise ValueError("labels must be non-negative class indices 0..C-1")
    count = torch.bincount(labels, minlength=num_classes)
    if count.numel() != num_classes:
        raise ValueError(
            f"labels contain class index {count.numel() - 1} but num_classes={num_classes}; "
            "labels must lie in 0..num_classes-1"
        )
    order = torch.argsort(labels, stable=True)
    start = torch.cumsum(count, 0) - count
    return order, count, start


def _check_embeddings(embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    if embeddings.dim() != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(embeddings.shape)}")
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(
            f"labels must be [N] with N={embeddings.shape[0]} (one label per embedding row), "
            f"got shape {tuple(labels.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got dtype {embeddings.dtype}")


def class_moments(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, full: bool):
    """Per-class count, mean and centred second moment of ``embeddings``.

    Args:
        embeddings: [N, D] floating point (any dtype; accumulated in float32).
        labels: [N] int64 class indices in ``0..num_classes-1``, any order.
        num_classes: C.
        full: False -> diagonal second moment [C, D]; True -> full [C, D, D].

    Returns:
        count [C] int64 (rows per class), mean [C, D] float32, m2 float32 [C, D] or
        [C, D, D]: the summed centred second moment Σ_i (x_i − μ_k)(x_i − μ_k)^T (its
        diagonal when ``full`` is False; divide by the count for the population covariance
        of the official estimator). Absent classes get count 0, mean 0 and m2 0.

    Raises:
        ValueError: shapes, dtypes or label range (messages say what to fix).

    Spec: IAA.md §3 (Eq. 7-8). Triton when :func:`use_triton` allows, else PyTorch.
    """
    _check_embeddings(embeddings, labels)
    order, count, start = _segments(labels, num_classes)
    if use_triton(embeddings, labels):
        return _moments_triton(embeddings, order, count, start, full)
    return _moments_torch(embeddings, labels.long(), order, count, start, full)


def _moments_torch(x, labels, order, count, start, full):
    num_classes, dim = count.numel(), x.shape[1]
    x32 = x.float()
    denom = count.clamp_min(1).to(torch.float32)
    mean = torch.zeros(num_classes, dim, device=x.device).index_add_(0, labels, x32) / denom[:, None]
    centred = x32 - mean[labels]
    if not full:
        m2 = torch.zeros_like(mean).index_add_(0, labels, centred * centred)
        return count, mean, m2
    # Full: scatter each class's centred rows into a zero-padded [C, P, D] block, one bmm.
    width = int(count.max()) if count.numel() else 0
    sorted_labels = labels[order]
    position = torch.arange(labels.numel(), device=x.device) - start[sorted_labels]
    padded = x32.new_zeros(num_classes, width, dim)
    padded[sorted_labels, position] = centred[order]
    m2 = torch.bmm(padded.transpose(1, 2), padded)
    return count, mean, m2


def _moments_triton(x, order, count, start, full):
    num_classes, dim = count.numel(), x.shape[1]
    x = x.contiguous()
    mean = torch.empty(num_classes, dim, device=x.device, dtype=torch.float32)
    diag = None if full else torch.empty_like(mean)
    block_d = min(128, triton.next_power_of_2(dim))
    grid = (num_classes, triton.cdiv(dim, block_d))
    _mean_diag_kernel[grid](
        x, order, start, count, mean, mean if diag is None else diag, dim, x.stride(0),
        BLOCK_N=32, BLOCK_D=block_d, WRITE_DIAG=not full,
    )
    if not full:
        return count, mean, diag
    m2 = torch.empty(num_classes, dim, dim, device=x.device, dtype=torch.float32)
    block = min(64, max(16, triton.next_power_of_2(dim)))
    nb = triton.cdiv(dim, block)
    _full_kernel[(num_classes, nb, nb)](
        x, order, start, count, mean, m2, dim, x.stride(0), BLOCK_N=32, BLOCK=block,
    )
    return count, mean, m2


if triton is not None:

    @triton.jit
    def _class_tile(x_ptr, order_ptr, start, n, i, cols, cmask, stride_x, BLOCK_N: tl.constexpr):
        """Samples i .. i + BLOCK_N of a class (rows order[start + r], r < n) on the feature
        columns ``cols``: the float32 tile [BLOCK_N, len(cols)] (0 where masked) and its mask."""
        r = i + tl.arange(0, BLOCK_N)
        rmask = r < n
        rows = tl.load(order_ptr + start + r, mask=rmask, other=0)
        m = rmask[:, None] & cmask[None, :]
        xt = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=m, other=0.0)
        return xt.to(tl.float32), m

    @triton.jit
    def _mean_diag_kernel(x_ptr, order_ptr, start_ptr, count_ptr, mean_ptr, diag_ptr, D, stride_x,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_DIAG: tl.constexpr):
        """Program (class c, feature block): two-pass mean and diagonal centred moment."""
        c = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        cmask = cols < D
        start = tl.load(start_ptr + c)
        n = tl.load(count_ptr + c)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for i in range(0, n, BLOCK_N):
            xt, m = _class_tile(x_ptr, order_ptr, start, n, i, cols, cmask, stride_x, BLOCK_N)
            acc += tl.sum(xt, axis=0)
        nf = tl.maximum(n, 1).to(tl.float32)
        mean = acc / nf
        tl.store(mean_ptr + c * D + cols, mean, mask=cmask)
        if WRITE_DIAG:
            acc2 = tl.zeros([BLOCK_D], dtype=tl.float32)
            for i in range(0, n, BLOCK_N):
                xt, m = _class_tile(x_ptr, order_ptr, start, n, i, cols, cmask, stride_x, BLOCK_N)
                dev = tl.where(m, xt - mean[None, :], 0.0)
                acc2 += tl.sum(dev * dev, axis=0)
            tl.store(diag_ptr + c * D + cols, acc2, mask=cmask)

    @triton.jit
    def _full_kernel(x_ptr, order_ptr, start_ptr, count_ptr, mean_ptr, m2_ptr, D, stride_x,
                     BLOCK_N: tl.constexpr, BLOCK: tl.constexpr):
        """Program (class c, block i, block j >= i): centred (X_i − μ_i)^T (X_j − μ_j),
        written to block (i, j) and, transposed, to block (j, i)."""
        c = tl.program_id(0)
        bi = tl.program_id(1)
        bj = tl.program_id(2)
        if bj >= bi:
            ci = bi * BLOCK + tl.arange(0, BLOCK)
            cj = bj * BLOCK + tl.arange(0, BLOCK)
            mi = ci < D
            mj = cj < D
            mean_i = tl.load(mean_ptr + c * D + ci, mask=mi, other=0.0)
            mean_j = tl.load(mean_ptr + c * D + cj, mask=mj, other=0.0)
            start = tl.load(start_ptr + c)
            n = tl.load(count_ptr + c)
            acc = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for i in range(0, n, BLOCK_N):
                xi, mask_i = _class_tile(x_ptr, order_ptr, start, n, i, ci, mi, stride_x, BLOCK_N)
                xj, mask_j = _class_tile(x_ptr, order_ptr, start, n, i, cj, mj, stride_x, BLOCK_N)
                di = tl.where(mask_i, xi - mean_i[None, :], 0.0)
                dj = tl.where(mask_j, xj - mean_j[None, :], 0.0)
                acc += tl.dot(tl.trans(di), dj, input_precision="ieee")
            base = m2_ptr + c.to(tl.int64) * D * D
            tl.store(base + ci[:, None] * D + cj[None, :], acc, mask=mi[:, None] & mj[None, :])
            if bj > bi:
                tl.store(base + cj[:, None] * D + ci[None, :], tl.trans(acc),
                         mask=mj[:, None] & mi[None, :])
