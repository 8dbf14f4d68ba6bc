"""Adaptive synthesis (Eq. 17 of the paper, docs/method.md §5): ẑ = z + scale · L_y ε, with one
Triton kernel (a single launch) and one PyTorch implementation behind :func:`synthesize`.

Three factor forms, picked from the type of ``factor``:

* diagonal: Tensor [C, D], the per-dimension standard deviation (√diag Σ_k);
* full:     Tensor [C, D, D], lower-triangular Cholesky factors (``fastiaa.iaa.cholesky_factor``);
* low rank: :class:`LowRankFactor`, Σ_k = Σ_e c_e² v_e v_eᵀ + g_k² G Gᵀ, sampled as
  Σ_e c_e η_e v_e + g_k G ε with independent standard normals η, ε (exact in distribution).

Noise. Randomness comes from a CPU ``torch.Generator`` whatever the device, so a run is
reproducible from that generator's state and drawing never waits for a GPU:

* PyTorch on CPU tensors: ε = ``torch.randn((M, B, D), generator=generator)`` (then, for the
  low-rank form, η = ``torch.randn((M, B, W))``, W the widest entry list of the batch).
* Triton, or PyTorch on CUDA tensors: one seed is drawn on the host (:func:`draw_seed`) and keys
  the device noise: the Philox stream of the kernel (``tl.randn``, counter of element (sample m,
  row b, noise index t) = (m·B + b)·S + t with S = D, or D + max_entries for the low-rank form,
  t = D + e for the e-th low-rank entry), or a CUDA ``torch.Generator`` seeded with it.

The kernel is compiled once per dtype, D, M and form: the seed is never specialised (its top bit
is set so that Triton always types it as a 64-bit integer), and the sample axis is padded to the
next power of two of M only (the products are broadcast sums, not ``tl.dot``, which would need 16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._dispatch import check_embeddings, launch, reads_values, tl, triton, use_triton

_INT32_MAX = 2**31 - 1
_SEED_BIT = 1 << 62   # every kernel seed has it: one 64-bit seed type, one compile
_DIAG, _FULL, _LOWRANK = 0, 1, 2
_BLOCK_J = 16         # columns of a Cholesky tile per step (full, low-rank global part)
_BLOCK_E = 16         # low-rank entries per step


@dataclass(frozen=True)
class LowRankFactor:
    """A per-class covariance as a sum of rank-one terms plus a shared global part.

    Σ_k = Σ_{e ∈ [entry_ptr[k], entry_ptr[k+1])} entry_coef[e]² · v vᵀ  (v = rows[entry_row[e]])
          + global_coef[k]² · G Gᵀ

    Fields:
        rows: [R, D] float32 table of vectors (e.g. the classes' centred embeddings).
        entry_ptr: [C + 1] int64 CSR offsets of each class's entries.
        entry_row: [E] int64 row index of each entry into ``rows``.
        entry_coef: [E] float32 coefficient c_e of each entry.
        global_factor: [D, D] float32 lower-triangular G.
        global_coef: [C] float32 g_k.
        max_entries: the largest entry count of a class (sets the noise counter stride).

    Memory: 4·R·D + 12·E + 4·D² + 12·C bytes (bench/RESULTS.md has the SOP figure).
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
        """Dense Σ_k for ``classes`` ([k] int64, default all): [k, D, D] float32 (small problems only)."""
        if classes is None:
            classes = torch.arange(self.num_classes, device=self.rows.device)
        count = self.entry_ptr[1:] - self.entry_ptr[:-1]
        owner = torch.repeat_interleave(torch.arange(self.num_classes, device=self.rows.device), count)
        weighted = self.rows[self.entry_row] * self.entry_coef[:, None]
        lowrank = torch.zeros(self.num_classes, self.dim, self.dim, device=self.rows.device)
        lowrank.index_add_(0, owner, weighted[:, :, None] * weighted[:, None, :])
        glob = self.global_factor @ self.global_factor.T
        return (lowrank + self.global_coef[:, None, None] ** 2 * glob)[classes]


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One seed in [0, 2**63 − 1) from a CPU ``generator`` (None: the global CPU generator).

    Runs on the host only (never synchronises a GPU); advances ``generator`` by one draw.
    """
    return int(torch.randint(0, 2**63 - 1, (), generator=generator))


def synthesize(embeddings: torch.Tensor, labels: torch.Tensor, factor, scale: float, num: int,
               generator: torch.Generator | None = None, repeated_sqrt: bool = False,
               backend: str = "auto") -> torch.Tensor:
    """Draw ``num`` synthetic embeddings per row: ẑ[m, b] = z_b + scale · L_{y_b} ε[m, b] (Eq. 17).

    Args:
        embeddings: [B, D] float (z); gradients flow to it (∂ẑ[m, b]/∂z_b = I).
        labels: [B] integer class of each row, in [0, C) (range-checked on the CPU only: on a GPU
            the check would synchronise every step).
        factor: Tensor [C, D] standard deviations (diagonal Σ), Tensor [C, D, D] lower Cholesky
            factors (full Σ), or :class:`LowRankFactor`, on the embeddings' device. No gradient.
        scale: √λ_t (the sample covariance is scale² Σ).
        num: M >= 1, samples per row.
        generator: CPU ``torch.Generator`` (None: the global one); see the module doc.
        repeated_sqrt: the official code's quirk (diagonal only): sample m (1-based) uses
            Σ^(1/2^m) element-wise as its standard deviation.
        backend: ``"auto" | "triton" | "torch"`` (see ``fastiaa.kernels``).

    Returns:
        [num, B, D] in the dtype of ``embeddings``; block m holds the m-th draw of every row.

    Raises:
        ValueError: shapes, devices or arguments (messages say what to fix); NaN / Inf
            embeddings on the CPU.
    """
    mode = _check_synthesis(embeddings, labels, factor, num, generator, repeated_sqrt)
    labels = labels.long()
    if use_triton(backend, embeddings, labels, *_factor_tensors(factor)):
        return _SynthesizeTriton.apply(embeddings, labels, factor, float(scale), int(num), draw_seed(generator),
                                       mode, bool(repeated_sqrt))
    with torch.no_grad():
        offset = _offset_torch(embeddings, labels, factor, num, generator, repeated_sqrt, mode)
    return embeddings.unsqueeze(0) + (scale * offset).to(embeddings.dtype)


def _factor_tensors(factor):
    if isinstance(factor, LowRankFactor):
        return (factor.rows, factor.global_factor)
    return (factor,)


def _check_synthesis(z, labels, factor, num, generator, repeated_sqrt) -> int:
    if isinstance(factor, LowRankFactor):
        mode, num_classes, fdim, stride = _LOWRANK, factor.num_classes, factor.dim, z.shape[-1] + factor.max_entries
    elif isinstance(factor, torch.Tensor) and factor.dim() == 2:
        mode, num_classes, fdim, stride = _DIAG, factor.shape[0], factor.shape[1], z.shape[-1]
    elif isinstance(factor, torch.Tensor) and factor.dim() == 3 and factor.shape[1] == factor.shape[2]:
        mode, num_classes, fdim, stride = _FULL, factor.shape[0], factor.shape[1], z.shape[-1]
    else:
        raise ValueError("factor must be a [C, D] std tensor, a [C, D, D] lower Cholesky tensor or a "
                         f"LowRankFactor, got {type(factor).__name__} {tuple(getattr(factor, 'shape', ()))}")
    check_embeddings(z, labels, num_classes, values=reads_values(z))
    if fdim != z.shape[1]:
        raise ValueError(f"factor dimension {fdim} does not match the embedding size D={z.shape[1]}")
    device = _factor_tensors(factor)[0].device
    if device != z.device:
        raise ValueError(f"the factor is on {device} but the embeddings on {z.device}; move it once per refresh")
    if num < 1:
        raise ValueError(f"num (samples per embedding, aug_num) must be >= 1, got {num}")
    if repeated_sqrt and mode != _DIAG:
        raise ValueError("repeated_sqrt reproduces a quirk of the official diagonal code; use it with a "
                         "diagonal covariance (not a full or low-rank one)")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator (got one on {generator.device}): the noise is "
                         "keyed on the host so that no step waits for the GPU; create it with torch.Generator()")
    if num * z.shape[0] * stride > _INT32_MAX:
        raise ValueError(f"num·B·(noise per row) = {num * z.shape[0] * stride} exceeds the 32-bit Philox counter; "
                         "synthesise in smaller batches")
    return mode


def _offset_torch(z, labels, factor, num, generator, repeated_sqrt, mode):
    """L_y ε for every sample, [num, B, D] float32 (PyTorch; noise as in the module doc)."""
    if z.device.type != "cpu":
        generator = torch.Generator(z.device).manual_seed(draw_seed(generator))
    batch, dim = z.shape
    eps = torch.randn((num, batch, dim), generator=generator, device=z.device, dtype=torch.float32)
    if mode == _DIAG:
        std = factor.index_select(0, labels).float()
        if repeated_sqrt:  # Σ^(1/2^m) = std^(2^(1-m)), m = 1..num
            std = std.unsqueeze(0) ** (2.0 ** -torch.arange(num, device=z.device, dtype=torch.float32)).view(-1, 1, 1)
        return std * eps
    if mode == _FULL:
        return _apply_cholesky(factor, labels, eps)
    start = factor.entry_ptr[labels]
    count = factor.entry_ptr[labels + 1] - start
    width = int(count.max()) if batch else 0
    pos = torch.arange(width, device=z.device)
    valid = pos[None, :] < count[:, None]
    entry = torch.where(valid, start[:, None] + pos[None, :], 0)
    coef = torch.where(valid, factor.entry_coef[entry], 0.0)               # [B, W]
    vectors = factor.rows[factor.entry_row[entry]]                          # [B, W, D]
    eta = torch.randn((num, batch, width), generator=generator, device=z.device, dtype=torch.float32)
    noise = torch.einsum("mbw,bwd->mbd", eta * coef, vectors)
    return noise + factor.global_coef[labels][None, :, None] * (eps @ factor.global_factor.T)


def _apply_cholesky(factor, labels, eps):
    """L_{y_b} ε[m, b] for all m, b: each class present in the batch is gathered once, and its
    rows' noise is multiplied in one ``bmm`` over a ``[U, rows_per_class · num, D]`` block."""
    num, b, d = eps.shape
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    factors = factor.index_select(0, classes).float()
    order = torch.argsort(inverse, stable=True)
    group = inverse[order]
    position = torch.arange(b, device=labels.device) - (torch.cumsum(counts, 0) - counts)[group]
    block = eps.new_zeros((classes.numel(), int(counts.max()), num, d))
    block[group, position] = eps.transpose(0, 1)[order]
    mixed = torch.bmm(block.view(classes.numel(), -1, d), factors.transpose(1, 2)).view(block.shape)
    offset = torch.empty_like(eps)
    offset[:, order] = mixed[group, position].transpose(0, 1)
    return offset


class _SynthesizeTriton(torch.autograd.Function):
    """Triton forward; backward sums the output gradient over the samples (factor: no grad)."""

    @staticmethod
    def forward(ctx, z, labels, factor, scale, num, seed, mode, repeated_sqrt):
        return _launch(z, labels, factor, scale, num, seed, mode, repeated_sqrt)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.sum(0), None, None, None, None, None, None, None


def _launch(z, labels, factor, scale, num, seed, mode, repeated_sqrt):
    z = z.contiguous()
    labels = labels.contiguous()
    batch, dim = z.shape
    out = torch.empty(num, batch, dim, device=z.device, dtype=z.dtype)
    block_d = min(1024, triton.next_power_of_2(dim)) if mode == _DIAG else min(64, triton.next_power_of_2(dim))
    if mode == _LOWRANK:
        fac = factor.global_factor.contiguous()
        rows, ptr, erow, ecoef, gcoef = (factor.rows.contiguous(), factor.entry_ptr, factor.entry_row,
                                         factor.entry_coef, factor.global_coef)
        stride = dim + factor.max_entries
    else:
        fac = factor.contiguous()
        rows = ptr = erow = ecoef = gcoef = fac  # unused by the diagonal / full modes
        stride = dim
    launch(_synthesize_kernel, (batch, triton.cdiv(dim, block_d)),
           z, labels, out, fac, rows, ptr, erow, ecoef, gcoef, batch, dim, num, stride, scale, seed | _SEED_BIT,
           MODE=mode, REPEATED_SQRT=repeated_sqrt, BLOCK_D=block_d, BLOCK_J=_BLOCK_J, BLOCK_E=_BLOCK_E,
           NUM_P=triton.next_power_of_2(num))
    return out


if triton is not None:

    @triton.jit
    def _apply_tril(l_ptr, rows_i, mask_i, D, seed, counter, mask_m, row_end,
                    BLOCK_D: tl.constexpr, BLOCK_J: tl.constexpr, NUM_P: tl.constexpr):
        """[BLOCK_D, NUM_P] = L[rows_i, :row_end] @ ε[:row_end, m] for a lower-triangular L
        ([D, D] row-major at l_ptr); ε[j, m] = randn(seed, counter[m] + j). Broadcast products
        summed over BLOCK_J columns per step."""
        acc = tl.zeros([BLOCK_D, NUM_P], dtype=tl.float32)
        for j0 in range(0, row_end, BLOCK_J):
            cj = j0 + tl.arange(0, BLOCK_J)
            mask_j = cj < row_end
            lt = tl.load(l_ptr + rows_i[:, None] * D + cj[None, :],
                         mask=mask_i[:, None] & mask_j[None, :], other=0.0).to(tl.float32)
            eps = tl.randn(seed, counter[None, :] + cj[:, None])
            eps = tl.where(mask_j[:, None] & mask_m[None, :], eps, 0.0)
            acc += tl.sum(lt[:, :, None] * eps[None, :, :], axis=1)
        return acc

    @triton.jit(do_not_specialize=["seed"])
    def _synthesize_kernel(z_ptr, y_ptr, out_ptr, fac_ptr, rows_ptr, ptr_ptr, erow_ptr, ecoef_ptr,
                           gcoef_ptr, B, D, num, stride, scale, seed,
                           MODE: tl.constexpr, REPEATED_SQRT: tl.constexpr, BLOCK_D: tl.constexpr,
                           BLOCK_J: tl.constexpr, BLOCK_E: tl.constexpr, NUM_P: tl.constexpr):
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
            if REPEATED_SQRT:  # sample m (0-based) uses std^(2^-m); std = 0 stays 0
                power = tl.exp2(-ms.to(tl.float32))
                acc = tl.exp2(tl.log2(std)[:, None] * power[None, :]) * eps
            else:
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
                            mask=mask_e[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                t = (D + ee - e_start).to(tl.int32)
                eta = tl.randn(seed, counter[None, :] + t[:, None])
                eta = tl.where(mask_e[:, None] & mask_m[None, :], eta * c[:, None], 0.0)
                acc += tl.sum(v[:, :, None] * eta[:, None, :], axis=0)
        z = tl.load(z_ptr + b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        out = z[:, None] + scale * acc
        tl.store(out_ptr + (ms[None, :] * B + b) * D + cols[:, None], out,
                 mask=mask_d[:, None] & mask_m[None, :])
