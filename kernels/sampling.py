"""Adaptive synthesis (spec IAA.md §5, Eq. 17): ẑ = z + scale · L_y ε in one launch.

Three factor forms, picked from the type of ``factor``:

* diagonal: Tensor [C, D], the per-dimension standard deviation (√diag Σ_k);
* full:     Tensor [C, D, D], lower-triangular Cholesky factors (``fastiaa.iaa.sampling_factor``);
* low rank: :class:`LowRankFactor`, Σ_k = Σ_e c_e² v_e v_eᵀ + g_k² G Gᵀ, sampled as
  Σ_e c_e η_e v_e + g_k G ε with independent standard normals η, ε (exact in distribution).

Noise: Philox (``tl.randn``) keyed by ``seed``; the counter of element (sample m, row b,
noise index t) is (m·B + b)·S + t with S = D (diagonal, full) or D + max_entries
(low rank; t < D for ε, t = D + e for the class's e-th low-rank entry). So one seed gives
the same ε for every factor form, and a draw is reproducible. The PyTorch fallback
(CPU tensors) draws its noise with ``torch.randn`` from a generator seeded with ``seed``:
reproducible too, but a different stream from the Triton one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import tl, triton, use_triton

_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class LowRankFactor:
    """A per-class covariance as a sum of rank-one terms plus a shared global part.

    Σ_k = Σ_{e ∈ [entry_ptr[k], entry_ptr[k+1])} entry_coef[e]² · v v^T  (v = rows[entry_row[e]])
          + global_coef[k]² · G G^T

    Fields:
        rows: [R, D] float32 table of vectors (e.g. the classes' centred embeddings).
        entry_ptr: [C + 1] int64 CSR offsets of each class's entries.
        entry_row: [E] int64 row index of each entry into ``rows``.
        entry_coef: [E] float32 coefficient c_e of each entry.
        global_factor: [D, D] float32 lower-triangular G.
        global_coef: [C] float32 g_k.
        max_entries: the largest entry count of a class (sets the noise counter stride).

    Memory: 4·R·D + 12·E + 4·D² + 12·C bytes. SOP (D = 512, K = 25 neighbours), after a
    refresh that keeps one refresh of rows: R = 70,869 rows, E = 2.59 M entries → 169 MiB
    (dense Cholesky factors: 11.1 GiB).
    """

    rows: torch.Tensor
    entry_ptr: torch.Tensor
    entry_row: torch.Tensor
    entry_coef: torch.Tensor
    global_factor: torch.Tensor
    global_coef: torch.Tensor
    max_entries: int

    @property
    def num_classes(self) -> int:
        return self.global_coef.numel()

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def nbytes(self) -> int:
        """Bytes held by the factor's tensors."""
        return sum(t.numel() * t.element_size() for t in (self.rows, self.entry_ptr, self.entry_row,
                                                          self.entry_coef, self.global_factor, self.global_coef))

    def to(self, device) -> "LowRankFactor":
        """The same factor on ``device``."""
        return LowRankFactor(self.rows.to(device), self.entry_ptr.to(device), self.entry_row.to(device),
                             self.entry_coef.to(device), self.global_factor.to(device),
                             self.global_coef.to(device), self.max_entries)

    def covariance(self, classes: torch.Tensor | None = None) -> torch.Tensor:
        """Dense Σ_k for ``classes`` ([k] int64, default all): [k, D, D] float32.

        For tests and small problems only (C·D² floats)."""
        if classes is None:
            classes = torch.arange(self.num_classes, device=self.rows.device)
        count = self.entry_ptr[1:] - self.entry_ptr[:-1]
        owner = torch.repeat_interleave(torch.arange(self.num_classes, device=self.rows.device), count)
        weighted = self.rows[self.entry_row] * self.entry_coef[:, None]
        lowrank = torch.zeros(self.num_classes, self.dim, self.dim, device=self.rows.device)
        lowrank.index_add_(0, owner, weighted[:, :, None] * weighted[:, None, :])
        glob = self.global_factor @ self.global_factor.T
        return (lowrank + self.global_coef[:, None, None] ** 2 * glob)[classes]


def synthesize(embeddings: torch.Tensor, labels: torch.Tensor, factor, scale: float, num: int,
               seed: int) -> torch.Tensor:
    """Draw ``num`` synthetic embeddings per row: ẑ[m, b] = z_b + scale · L_{y_b} ε[m, b].

    Args:
        embeddings: [B, D] float (z); gradients flow to it (∂ẑ[m,b]/∂z_b = I, so the
            gradient of z is the sum over the ``num`` samples of the output gradient).
        labels: [B] int64 class of each row, in 0..C-1 (not range-checked on CUDA).
        factor: Tensor [C, D] standard deviations (diagonal Σ), Tensor [C, D, D] lower
            Cholesky factors (full Σ), or :class:`LowRankFactor`. Receives no gradient.
        scale: √λ_t (the sample covariance is scale² Σ).
        num: M, samples per row (>= 1).
        seed: Philox / generator seed, 0 <= seed < 2**63.

    Returns:
        [num, B, D] in the dtype of ``embeddings``.

    Raises:
        ValueError: shapes or arguments (messages say what to fix).

    Spec: IAA.md §5, Eq. 17.
    """
    mode = _check_synthesis(embeddings, labels, factor, num, seed)
    if use_triton(embeddings, labels, *_factor_tensors(factor)):
        return _SynthesizeTriton.apply(embeddings, labels, factor, float(scale), int(num), int(seed), mode)
    with torch.no_grad():
        noise = _noise_torch(embeddings, labels, factor, num, seed, mode)
    return (embeddings.unsqueeze(0) + scale * noise).to(embeddings.dtype)


_DIAG, _FULL, _LOWRANK = 0, 1, 2


def _factor_tensors(factor):
    if isinstance(factor, LowRankFactor):
        return (factor.rows, factor.global_factor)
    return (factor,)


def _check_synthesis(z, labels, factor, num, seed) -> int:
    if z.dim() != 2 or not z.is_floating_point():
        raise ValueError(f"embeddings must be a float [B, D] tensor, got {tuple(z.shape)} {z.dtype}")
    if labels.shape != z.shape[:1]:
        raise ValueError(f"labels must be [B]={z.shape[0]}, got shape {tuple(labels.shape)}")
    if num < 1:
        raise ValueError(f"num (samples per embedding, aug_num) must be >= 1, got {num}")
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    dim = z.shape[1]
    if isinstance(factor, LowRankFactor):
        mode, fdim, stride = _LOWRANK, factor.dim, dim + factor.max_entries
    elif isinstance(factor, torch.Tensor) and factor.dim() == 2:
        mode, fdim, stride = _DIAG, factor.shape[1], dim
    elif isinstance(factor, torch.Tensor) and factor.dim() == 3 and factor.shape[1] == factor.shape[2]:
        mode, fdim, stride = _FULL, factor.shape[1], dim
    else:
        raise ValueError("factor must be a [C, D] std tensor, a [C, D, D] lower Cholesky tensor "
                         f"or a LowRankFactor, got {type(factor).__name__} "
                         f"{tuple(getattr(factor, 'shape', ()))}")
    if fdim != dim:
        raise ValueError(f"factor dimension {fdim} does not match the embedding size D={dim}")
    if num * z.shape[0] * stride > _INT32_MAX:
        raise ValueError(f"num·B·(noise per row) = {num * z.shape[0] * stride} exceeds the 32-bit "
                         "Philox counter; synthesise in smaller batches")
    return mode


def _noise_torch(z, labels, factor, num, seed, mode):
    """L_y ε for the PyTorch path: [num, B, D] float32 (noise from torch.randn(generator=seed))."""
    gen = torch.Generator(device=z.device).manual_seed(seed)
    batch, dim = z.shape
    eps = torch.randn(num, batch, dim, generator=gen, device=z.device)
    if mode == _DIAG:
        return factor[labels].float() * eps
    if mode == _FULL:
        return torch.einsum("bij,mbj->mbi", factor[labels].float(), eps)
    start = factor.entry_ptr[labels]
    count = factor.entry_ptr[labels + 1] - start
    width = int(count.max()) if batch else 0
    pos = torch.arange(width, device=z.device)
    valid = pos[None, :] < count[:, None]
    entry = torch.where(valid, start[:, None] + pos[None, :], 0)
    coef = torch.where(valid, factor.entry_coef[entry], 0.0)               # [B, W]
    vectors = factor.rows[factor.entry_row[entry]]                          # [B, W, D]
    eta = torch.randn(num, batch, width, generator=gen, device=z.device)
    noise = torch.einsum("mbw,bwd->mbd", eta * coef, vectors)
    return noise + factor.global_coef[labels][None, :, None] * (eps @ factor.global_factor.T)


class _SynthesizeTriton(torch.autograd.Function):
    """Triton forward; backward sums the output gradient over the samples (factor: no grad)."""

    @staticmethod
    def forward(ctx, z, labels, factor, scale, num, seed, mode):
        return _launch(z, labels, factor, scale, num, seed, mode)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.sum(0), None, None, None, None, None, None


def _launch(z, labels, factor, scale, num, seed, mode):
    z = z.contiguous()
    labels = labels.contiguous()
    batch, dim = z.shape
    out = torch.empty(num, batch, dim, device=z.device, dtype=z.dtype)
    if mode == _DIAG:
        block_d = min(1024, triton.next_power_of_2(dim))
        num_p = triton.next_power_of_2(max(num, 2))
    else:
        block_d = min(64, max(16, triton.next_power_of_2(dim)))
        num_p = max(16, triton.next_power_of_2(num))
    if mode == _LOWRANK:
        fac = factor.global_factor.contiguous()
        rows, ptr, erow, ecoef, gcoef = (factor.rows.contiguous(), factor.entry_ptr, factor.entry_row,
                                         factor.entry_coef, factor.global_coef)
        stride = dim + factor.max_entries
    else:
        fac = factor.contiguous()
        rows = ptr = erow = ecoef = gcoef = fac  # unused by the diagonal / full modes
        stride = dim
    grid = (batch, triton.cdiv(dim, block_d))
    _synthesize_kernel[grid](
        z, labels, out, fac, rows, ptr, erow, ecoef, gcoef,
        batch, dim, num, stride, scale, seed,
        MODE=mode, BLOCK_D=block_d, BLOCK_J=block_d, BLOCK_E=16, NUM_P=num_p,
    )
    return out


if triton is not None:

    @triton.jit
    def _apply_tril(l_ptr, rows_i, mask_i, D, seed, counter, mask_m, row_end,
                    BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, NUM_P: tl.constexpr):
        """[BLOCK_D, NUM_P] = L[rows_i, :row_end] @ ε[:row_end, m] for a lower-triangular L
        ([D, D] row-major at l_ptr); ε[j, m] = randn(seed, counter[m] + j)."""
        acc = tl.zeros([BLOCK_D, NUM_P], dtype=tl.float32)
        for j0 in range(0, row_end, BLOCK_J):
            cj = j0 + tl.arange(0, BLOCK_J)
            mask_j = cj < D
            lt = tl.load(l_ptr + rows_i[:, None] * D + cj[None, :],
                         mask=mask_i[:, None] & mask_j[None, :], other=0.0)
            eps = tl.randn(seed, counter[None, :] + cj[:, None])
            eps = tl.where(mask_j[:, None] & mask_m[None, :], eps, 0.0)
            acc += tl.dot(lt.to(tl.float32), eps, input_precision="ieee")
        return acc

    @triton.jit
    def _synthesize_kernel(z_ptr, y_ptr, out_ptr, fac_ptr, rows_ptr, ptr_ptr, erow_ptr, ecoef_ptr,
                           gcoef_ptr, B, D, num, stride, scale, seed,
                           MODE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr,
                           BLOCK_E: tl.constexpr, NUM_P: tl.constexpr):
        """Program (row b, feature block): all ``num`` samples of row b on that block."""
        b = tl.program_id(0)
        pd = tl.program_id(1)
        cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = cols < D
        ms = tl.arange(0, NUM_P)
        mask_m = ms < num
        counter = (ms * B + b) * stride                       # [NUM_P] Philox counter base
        y = tl.load(y_ptr + b).to(tl.int64)
        row_end = tl.minimum((pd + 1) * BLOCK_D, D)           # lower triangle: columns < row_end
        if MODE == 0:
            std = tl.load(fac_ptr + y * D + cols, mask=mask_d, other=0.0).to(tl.float32)
            eps = tl.randn(seed, counter[None, :] + cols[:, None])
            acc = std[:, None] * eps
        elif MODE == 1:
            acc = _apply_tril(fac_ptr + y * D * D, cols, mask_d, D, seed, counter, mask_m, row_end,
                              BLOCK_D, BLOCK_J, NUM_P)
        else:
            g = tl.load(gcoef_ptr + y)
            acc = g * _apply_tril(fac_ptr, cols, mask_d, D, seed, counter, mask_m, row_end,
                                  BLOCK_D, BLOCK_J, NUM_P)
            e_start = tl.load(ptr_ptr + y)
            e_end = tl.load(ptr_ptr + y + 1)
            for e0 in range(e_start, e_end, BLOCK_E):
                ee = e0 + tl.arange(0, BLOCK_E)
                mask_e = ee < e_end
                r = tl.load(erow_ptr + ee, mask=mask_e, other=0)
                c = tl.load(ecoef_ptr + ee, mask=mask_e, other=0.0)
                v = tl.load(rows_ptr + r[:, None] * D + cols[None, :],
                            mask=mask_e[:, None] & mask_d[None, :], other=0.0)
                t = (D + ee - e_start).to(tl.int32)
                eta = tl.randn(seed, counter[None, :] + t[:, None])
                eta = tl.where(mask_e[:, None] & mask_m[None, :], eta * c[:, None], 0.0)
                acc += tl.dot(tl.trans(v.to(tl.float32)), eta, input_precision="ieee")
        z = tl.load(z_ptr + b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        out = z[:, None] + scale * acc
        tl.store(out_ptr + (ms[None, :] * B + b) * D + cols[:, None], out,
                 mask=mask_d[:, None] & mask_m[None, :])
