"""Per-class moments (Eq. 7-8 of the paper, docs/method.md §3): count, mean and centred second
moment, with one Triton kernel and one PyTorch implementation behind :func:`class_moments`.

Triton: rows sorted by label once (stable sort), then one program per (class, feature block)
reduces its class's contiguous segment in two passes (mean, then centred products), float32
accumulators, no atomics: deterministic. PyTorch: class sums in float64 give the means, then the
float32 deviations from them give the corrected two-pass second moment, in bounded chunks.
"""
from __future__ import annotations

import torch

from fastiaa import memory

from ._dispatch import check_embeddings, launch, tl, triton, use_triton


def class_moments(embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, full: bool = False,
                  backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class count, mean and centred second moment of ``embeddings`` (Eq. 7-8).

    Args:
        embeddings: ``[N, D]`` floating (any precision; upcast), finite.
        labels: ``[N]`` integer class indices in ``[0, num_classes)``, any order.
        num_classes: C.
        full: False for the diagonal second moment ``[C, D]``, True for ``[C, D, D]``.
        backend: ``"auto" | "triton" | "torch"`` (see ``fastiaa.kernels``).

    Returns:
        ``count [C] int64``, ``mean [C, D] float32`` (0 for absent classes) and ``m2 float32``
        ``[C, D]`` or ``[C, D, D]``: Σ over the class of (z − μ)(z − μ)ᵀ (its diagonal unless
        ``full``); m2 / count is the population covariance of the official estimator.

    Raises:
        ValueError: see :func:`fastiaa.kernels.check_embeddings` (shapes, label range, NaN / Inf).
    """
    check_embeddings(embeddings, labels, num_classes)
    labels = labels.long()
    if use_triton(backend, embeddings, labels):
        return _moments_triton(embeddings, labels, num_classes, full)
    return _moments_torch(embeddings, labels, num_classes, full)


def _moments_torch(embeddings, labels, num_classes, full):
    """Class sums in float64 → means (rounded to float32); deviations d from them in float32 give
    m2 = Σ d dᵀ − (Σ d)(Σ d)ᵀ / n, which removes the error of rounding the mean (no E[z²] − E[z]²
    cancellation). Deterministic on the CPU (``index_add_``, ``bmm``)."""
    n, d = embeddings.shape
    count = torch.bincount(labels, minlength=num_classes)
    rows = max(1, memory.pass_elements(embeddings.device, parts=8) // max(d, 1))
    sums = embeddings.new_zeros((num_classes, d), dtype=torch.float64)
    for start in range(0, n, rows):
        sums.index_add_(0, labels[start:start + rows], embeddings[start:start + rows].double())
    mean = (sums / count.clamp_min(1).unsqueeze(1)).float()
    shift = torch.zeros_like(mean)
    if full:
        m2 = _full_second_moment(embeddings, labels, mean, count, shift)
    else:
        m2 = torch.zeros_like(mean)
        for start in range(0, n, rows):
            y = labels[start:start + rows]
            dev = embeddings[start:start + rows].float() - mean.index_select(0, y)
            shift.index_add_(0, y, dev)
            m2.index_add_(0, y, dev * dev)
    shift /= count.clamp_min(1).sqrt().unsqueeze(1)
    if full:
        m2 -= shift.unsqueeze(2) * shift.unsqueeze(1)
    else:
        m2 = (m2 - shift * shift).clamp_min_(0.0)
    return count, mean, m2


def _full_second_moment(embeddings, labels, mean, count, shift):
    """Σ per class of the outer products of deviations from ``mean``, ``[C, D, D]`` float32; adds
    the summed deviations to ``shift [C, D]``. Classes ordered by size; each chunk of consecutive
    classes is packed into a zero-padded ``[c, n_max, D]`` block and reduced with one ``bmm``."""
    num_classes, d = mean.shape
    order = torch.argsort(count, stable=True)  # ascending class size
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_classes, device=order.device)
    sample_order = torch.argsort(rank[labels], stable=True)  # samples grouped by class, in rank order
    sorted_counts = count[order]
    class_start = torch.cumsum(sorted_counts, 0) - sorted_counts  # first sample of each rank
    sorted_labels = labels[sample_order]
    position = torch.arange(labels.numel(), device=labels.device) - class_start[rank[sorted_labels]]
    dev = embeddings[sample_order].float() - mean.index_select(0, sorted_labels)
    shift.index_add_(0, sorted_labels, dev)

    m2 = torch.zeros((num_classes, d, d), dtype=torch.float32, device=embeddings.device)
    max_count = int(sorted_counts[-1]) if num_classes else 0
    step = max(1, memory.block_elements(parts=8) // (d * (d + max_count)))
    for lo in range(0, num_classes, step):
        hi = min(lo + step, num_classes)
        n_max = int(sorted_counts[hi - 1])
        if n_max == 0:
            continue
        s0 = int(class_start[lo])
        s1 = int(class_start[hi - 1] + sorted_counts[hi - 1])
        block = dev.new_zeros((hi - lo, n_max, d))
        block[rank[sorted_labels[s0:s1]] - lo, position[s0:s1]] = dev[s0:s1]
        m2[order[lo:hi]] = torch.bmm(block.transpose(1, 2), block)
    return m2


def _moments_triton(x, labels, num_classes, full):
    dim = x.shape[1]
    x = x.contiguous()
    count = torch.bincount(labels, minlength=num_classes)
    order = torch.argsort(labels, stable=True)
    start = torch.cumsum(count, 0) - count
    mean = torch.empty(num_classes, dim, device=x.device, dtype=torch.float32)
    diag = None if full else torch.empty_like(mean)
    block_d = min(128, triton.next_power_of_2(dim))
    grid = (num_classes, triton.cdiv(dim, block_d))
    launch(_mean_diag_kernel, grid, x, order, start, count, mean, mean if diag is None else diag, dim, x.stride(0),
           BLOCK_N=32, BLOCK_D=block_d, WRITE_DIAG=not full)
    if not full:
        return count, mean, diag
    m2 = torch.empty(num_classes, dim, dim, device=x.device, dtype=torch.float32)
    block = min(64, max(16, triton.next_power_of_2(dim)))
    nb = triton.cdiv(dim, block)
    launch(_full_kernel, (num_classes, nb, nb), x, order, start, count, mean, m2, dim, x.stride(0),
           BLOCK_N=32, BLOCK=block, num_warps=8)
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
        """Program (class c, block i, block j >= i): centred (X_i − μ_i)ᵀ (X_j − μ_j). Its upper
        triangle (all of it when j > i) is written at (i, j) and mirrored at (j, i), so the result
        is exactly symmetric."""
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
            keep = mi[:, None] & mj[None, :] & (ci[:, None] <= cj[None, :])
            tl.store(base + ci[:, None] * D + cj[None, :], acc, mask=keep)
            tl.store(base + cj[None, :] * D + ci[:, None], acc, mask=keep)
