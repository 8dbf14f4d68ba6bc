"""Exact retrieval metrics: Recall@K, MAP@R and R-Precision (docs/method.md §8).

Cosine similarity of L2-normalised embeddings, exact nearest neighbours, computed in blocks
so that no ``[Nq, Nr]`` similarity matrix is ever held whole.

Ranking rule (deterministic): references are ordered by decreasing float32 cosine
similarity; references with exactly equal similarity are ordered by increasing reference
index. In single-set mode the query's own row is removed by its index before ranking, so
exact duplicates and ties never change an answer, and every backend returns the same
numbers (except that two BLAS libraries may round a similarity differently in its last
bit, which can only swap two references whose similarities differ by about 1e-7).

Every metric is derived from the ranks of each query's positives (same-label references):
Recall@K from the rank of the first positive, MAP@R and R-Precision from the ranks of the
first R positives; a rank is the number of references ranked before the positive. Two
backends produce those ranks:

- ``"torch"``, single-set mode: one pass over the blocks of X Xᵀ, each unordered pair of
  blocks once (``fastiaa.blocks``: half the multiply-adds of a full search). Rows are grouped
  by class, every class inside one block, so a query's positives lie in its diagonal block:
  their similarities come first, and every block then only counts, for the rows on both of its
  sides, the references ranked before each positive (``_SymmetricRanker``). A class larger than
  a block falls back to the query/gallery path.
- ``"torch"``, query/gallery mode: per chunk of queries, one similarity block ``[c, Nr]``
  (matrix product), the ranks of the positives read off a short top-k list (``max(R, min(max
  K, 32))`` neighbours), and, where Recall@K needs a first positive further down, its rank
  counted exactly in the block row.
- ``"faiss"``: ``IndexFlatIP`` search of ``max(max K, R) + 1`` neighbours (+1 for the query
  itself in single-set mode), on the requested GPU (one ``StandardGpuResources`` per device and
  process, its temporary memory bounded by ``fastiaa.memory``, reused) or on the CPU; the
  positives' ranks are their positions in that list. Rows whose list ends inside a tie are
  recomputed by the torch path. A GPU search lists at most ``FAISS_GPU_MAX_K`` neighbours:
  ``"auto"`` takes the torch path beyond that (with a one-line warning).

``"auto"``: on a GPU, faiss when faiss sees one, else torch. On a CPU, the symmetric torch
pass in single-set mode (half the products of any full search); otherwise faiss on AMD
processors and torch elsewhere (``_faiss_first_on_this_cpu``); the choice is logged once per
process (logger ``fastiaa.evaluation.metrics``, shown by the ``fastiaa`` command).
"""

from __future__ import annotations

import functools
import logging
import platform
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from fastiaa import memory
from fastiaa.blocks import PaddedProduct, block_pairs, entries, even_side, float_order, padded

__all__ = ["retrieval_metrics", "FAISS_GPU_MAX_K"]

logger = logging.getLogger(__name__)

FAISS_GPU_MAX_K = 2048
"""Largest k a faiss GPU search accepts (faiss >= 1.7.3)."""

_DEVICE_TYPES = ("cpu", "cuda")

_SHORT_LIST = 32
"""Neighbours the torch backend lists beyond R; first positives further down are counted."""

_BEYOND = torch.iinfo(torch.int64).max
"""Rank given to positives that are ranked too far down to matter for any requested metric."""

_NO_KEY = torch.iinfo(torch.int64).min
"""Sort key of padding entries: below the key of every finite similarity."""

_TOP_KEY = torch.iinfo(torch.int64).max
"""Threshold key of padding slots: no entry is ranked before it."""


def retrieval_metrics(
    query,
    query_labels,
    reference=None,
    reference_labels=None,
    ks=(1, 2, 4, 8),
    map_at_r=True,
    device=None,
    backend="auto",
) -> dict:
    """Recall@K, MAP@R and R-Precision of cosine-similarity retrieval (docs/method.md §8).

    Args:
        query: ``[Nq, D]`` embeddings, torch tensor or numpy array of any float dtype, on any
            device. They are L2-normalised here (a zero row stays zero) and compared in float32.
        query_labels: ``[Nq]`` labels of any hashable kind (ints, strings; torch, numpy or a
            list). Labels are matched by value across query and reference, e.g. In-Shop item
            ids, so the two sides need no shared numbering, only comparable values.
        reference: ``[Nr, D]`` gallery embeddings, or None: the query set is also the reference
            set (CUB, Cars, SOP) and each query's own row is excluded by its index.
        reference_labels: ``[Nr]`` labels of ``reference``; must be None with ``reference=None``.
        ks: Recall@K cut-offs, positive ints (1,2,4,8 CUB/Cars; 1,10,100,1000 SOP; 1,10,20,30
            In-Shop).
        map_at_r: also compute MAP@R and R-Precision.
        device: where the similarities are computed; None: the query embeddings' device (the
            CPU for numpy arrays).
        backend: ``"auto"`` (the faster exact backend for the device, mode and processor: module
            docstring), ``"torch"`` or ``"faiss"`` (faiss's GPU index when faiss sees a GPU and
            ``device`` is not CPU, else its CPU index). All follow the ranking rule of the
            module docstring and give the same results.

    Returns:
        dict with ``"recall@K"`` for each K, ``"map@r"`` and ``"r_precision"`` (when
        ``map_at_r``), fractions in [0, 1] as Python floats, and ``"num_queries"`` (= Nq).

        Definitions (R = number of positives of the query in the reference set, itself
        excluded): Recall@K = share of queries with a positive among their K nearest
        references; R-Precision = positives among the R nearest / R; MAP@R =
        (1/R) sum_{i<=R} P(i) [i-th nearest is a positive], P(i) = precision at i
        (Musgrave, Belongie, Lim, ECCV 2020).

        Queries without any positive in the reference set (R = 0) follow the field's
        conventions: they count as misses in Recall@K, whose denominator is every query (the
        authors' recall: the share of all queries), and they are left out of MAP@R and
        R-Precision, which are undefined for R = 0 (as pytorch-metric-learning's
        AccuracyCalculator does). A warning gives their number; MAP@R and R-Precision are NaN
        if no query has a positive.

    Raises:
        TypeError: embeddings that are not float torch/numpy arrays; labels of incomparable
            kinds (numbers on one side, strings on the other).
        ValueError: wrong shapes, non-finite embeddings, a bad K, a K larger than the number of
            references (minus the query itself in single-set mode), a K beyond what the faiss
            GPU index returns (``FAISS_GPU_MAX_K``), an unknown backend or device.
        ImportError: ``backend="faiss"`` without the faiss package.
    """
    single = reference is None
    if single and reference_labels is not None:
        raise ValueError("reference_labels given without reference: pass both, or neither for single-set mode")
    if not single and reference_labels is None:
        raise ValueError("reference given without reference_labels: pass the [Nr] labels of the reference set")
    if backend not in ("auto", "torch", "faiss"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'faiss', got {backend!r}")
    ks = _check_ks(ks)
    device_given = device is not None
    device = torch.device(device if device is not None else (query.device if torch.is_tensor(query) else "cpu"))
    if device.type not in _DEVICE_TYPES:
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())

    q = _embeddings(query, "query", device)
    r = q if single else _embeddings(reference, "reference", device)
    if q.shape[1] != r.shape[1]:
        raise ValueError(f"query has dimension {q.shape[1]} but reference has {r.shape[1]}: embed both with one model")
    q_codes, r_codes = _label_codes(query_labels, len(q), None if single else reference_labels, len(r))
    positives = _Positives(r_codes, q_codes, single, device)

    available = len(r) - int(single)
    max_k = max(ks, default=0)
    if max_k > available:
        where = "references besides the query itself" if single else "references"
        raise ValueError(f"Recall@{max_k} needs at least {max_k} {where}; the reference set has {available}")

    symmetric = single and int(positives.count.max()) <= _SymmetricRanker.side()
    use_faiss, faiss_gpu = _choose_backend(backend, device, symmetric, explicit_device=device_given)
    length = max(max_k, positives.max_r if map_at_r else 1)  # neighbours whose labels are read
    if use_faiss and faiss_gpu and length + 1 + int(single) > FAISS_GPU_MAX_K:
        why = (f"the faiss GPU index returns at most {FAISS_GPU_MAX_K} neighbours but {length + 1 + int(single)} "
               f"are needed (max K = {max_k}, largest R = {positives.max_r}, +1 tie probe"
               f"{', +1 self' if single else ''})")
        if backend == "faiss":
            raise ValueError(f"{why}: use backend='torch'")
        warnings.warn(f"{why}: evaluating with the exact torch backend instead", stacklevel=2)
        use_faiss = False
    if use_faiss:
        ranker = _FaissRanker(r, positives, single, max_k, map_at_r, length, device if faiss_gpu else None)
    elif symmetric:
        ranker = _SymmetricRanker(q, positives, max_k, map_at_r)
    else:
        ranker = _TorchRanker(r, positives, single, max_k, map_at_r)

    totals = _Totals(ks, map_at_r)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # full float32 products even where TF32 is enabled
    try:
        for start, stop in ranker.chunks(len(q)):
            rows = torch.arange(start, stop, device=device)
            totals.add(ranker.ranks(q[start:stop], rows), positives.r[rows])
    finally:
        torch.set_float32_matmul_precision(precision)
    return totals.result(len(q))


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers (Recall@K cut-offs), got {ks}")
    return tuple(int(k) for k in ks)


def _embeddings(x, name: str, device: torch.device) -> torch.Tensor:
    """[N, D] float torch/numpy -> [N, D] float32 L2-normalised tensor on ``device``."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a torch tensor or numpy array of embeddings, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must hold floating-point embeddings, got dtype {x.dtype}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [N, D] matrix of embeddings, got shape {tuple(x.shape)}")
    x = x.detach().to(device=device, dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds NaN or infinite values: check the model output (AMP overflow?)")
    return F.normalize(x, dim=1).contiguous()


def _label_array(labels, n: int, name: str) -> np.ndarray:
    if torch.is_tensor(labels):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"{name} must be 1-D with one label per embedding row ({n}), got shape {labels.shape}")
    return labels


def _label_codes(query_labels, nq: int, reference_labels, nr: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels of both sides -> shared int64 codes (numpy.unique over the concatenation)."""
    ql = _label_array(query_labels, nq, "query_labels")
    if reference_labels is None:
        codes = np.unique(ql, return_inverse=True)[1].astype(np.int64)
        return codes, codes
    rl = _label_array(reference_labels, nr, "reference_labels")
    if (ql.dtype.kind in "biuf") != (rl.dtype.kind in "biuf"):
        raise TypeError(
            f"query_labels ({ql.dtype}) and reference_labels ({rl.dtype}) are not comparable: "
            "give both as numbers or both as strings (e.g. In-Shop item ids)"
        )
    codes = np.unique(np.concatenate([ql, rl]), return_inverse=True)[1].astype(np.int64)
    return codes[:nq], codes[nq:]


def _choose_backend(backend: str, device: torch.device, symmetric: bool, explicit_device: bool) -> tuple[bool, bool]:
    """-> (use faiss, faiss on GPU); ``symmetric``: the single-set pass of the torch backend applies."""
    if backend == "torch":
        return False, False
    if backend == "auto" and device.type == "cpu":
        faiss_first = not symmetric and _faiss_first_on_this_cpu()
        _report_auto(symmetric, faiss_first)
        if not faiss_first:
            return False, False
    try:
        import faiss
    except ImportError:
        if backend == "faiss":
            raise ImportError("backend='faiss' needs the faiss package: pip install faiss-cpu (or faiss-gpu)") from None
        return False, False
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if backend == "faiss" and explicit_device and device.type == "cuda" and gpus == 0:
        raise ValueError(
            "device is CUDA but this faiss build sees no GPU (faiss-cpu): use device='cpu' or backend='torch'"
        )
    on_gpu = device.type == "cuda" and gpus > 0
    return backend == "faiss" or on_gpu or device.type == "cpu", on_gpu


@functools.lru_cache(maxsize=None)
def _report_auto(symmetric: bool, faiss_first: bool) -> None:
    """One log line per process and choice of ``backend="auto"`` on a CPU."""
    how = "torch, symmetric blocks" if symmetric else "faiss" if faiss_first else "torch"
    logger.info("retrieval_metrics(backend='auto') on this %s CPU: %s", _cpu_vendor() or "unknown", how)


def _faiss_first_on_this_cpu() -> bool:
    """The rule of ``"auto"`` on a CPU for passes over the whole reference set (query/gallery
    mode, or a class larger than a symmetric block): faiss on AMD processors, torch elsewhere.
    Measured with bench/bench_eval.py: torch's products (MKL) run slower than faiss's (OpenBLAS)
    on AMD EPYC and faster on Intel (bench/RESULTS.md). A rule rather than a timing, so that one
    machine always takes the same backend (records stay bit-for-bit reproducible)."""
    return _cpu_vendor() == "AMD"


@functools.lru_cache(maxsize=None)
def _cpu_vendor() -> str | None:
    """"AMD", "Intel" or None (unknown), from /proc/cpuinfo (Linux) or the platform."""
    text = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            text = next((line for line in info if line.startswith("vendor_id")), text)
    except OSError:
        pass
    return "AMD" if "AMD" in text else "Intel" if "Intel" in text else None


class _Positives:
    """Which references share a query's label: reference indices grouped by label code."""

    def __init__(self, r_codes: np.ndarray, q_codes: np.ndarray, single: bool, device: torch.device):
        count = np.bincount(r_codes, minlength=int(max(r_codes.max(), q_codes.max())) + 1)  # [C] references per code
        as_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)  # noqa: E731
        self.members = as_tensor(np.argsort(r_codes, kind="stable"))  # [Nr] grouped by code, ascending inside
        self.count, self.start = as_tensor(count), as_tensor(np.cumsum(count) - count)
        self.q_codes, self.r_codes = as_tensor(q_codes), as_tensor(r_codes)
        self.single = single
        self.r = self.count[self.q_codes] - int(single)  # [Nq] R of every query
        self.max_r = int(self.r.max())

    def table(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[c] query rows -> (idx [c, m] int64, valid [c, m] bool): their positives, padded, self removed."""
        codes = self.q_codes[rows]
        count = self.count[codes]
        slot = torch.arange(max(int(count.max()), 1), device=rows.device)
        valid = slot < count[:, None]
        idx = self.members[(self.start[codes][:, None] + slot).clamp(max=len(self.members) - 1)]
        if self.single:
            valid &= idx != rows[:, None]
        return idx, valid


def _rank_key(values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """int64 key whose decreasing order is the ranking order: similarity down, then index up
    (``fastiaa.blocks.float_order`` in the high 32 bits, ``2**32 - 1 - index`` in the low ones)."""
    return float_order(values) * (1 << 32) + ((1 << 32) - 1 - indices)


def _count_greater(block: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """[n, Nr] block, [n] thresholds -> [n] int64 number of entries > threshold per row.

    On CPU through numpy, whose compare-and-count is several times faster than torch's there.
    """
    if block.device.type == "cpu":
        counts = np.count_nonzero(block.numpy() > threshold.numpy()[:, None], axis=1)
        return torch.from_numpy(counts.astype(np.int64))
    return (block > threshold[:, None]).sum(1)


def _count_before(block: torch.Tensor, value: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Exact rank of entry (value, index) in each row of ``block``: entries ranked before it."""
    above = _count_greater(block, value)
    tied = _count_greater(block, torch.nextafter(value, torch.full_like(value, -torch.inf))) - above > 1
    if tied.any():
        rows = tied.nonzero().squeeze(1)
        columns = torch.arange(block.shape[1], device=block.device)
        equal_first = (block[rows] == value[rows, None]) & (columns < index[rows, None])
        above[rows] += equal_first.sum(1)
    return above


def _fit(rank: torch.Tensor, m: int) -> torch.Tensor:
    """[c, n] ranks -> [c, m]: cut, or padded with ``_BEYOND``."""
    if rank.shape[1] >= m:
        return rank[:, :m]
    return torch.cat([rank, rank.new_full((len(rank), m - rank.shape[1]), _BEYOND)], dim=1)


class _TorchRanker:
    """Positives' ranks from one similarity block per chunk of queries (module docstring)."""

    def __init__(self, reference: torch.Tensor, positives: _Positives, single: bool, max_k: int, map_at_r: bool):
        self.reference, self.positives, self.single = reference, positives, single
        self.max_k, self.map_at_r = max_k, map_at_r
        self.rows_per_chunk = max(1, memory.block_elements(parts=1) // len(reference))
        self.buffer = None  # one block, reused: fresh pages for every chunk cost up to 1/4 of the product

    def chunks(self, n: int):
        return ((s, min(s + self.rows_per_chunk, n)) for s in range(0, n, self.rows_per_chunk))

    def ranks(self, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """[c, D] queries (c <= rows_per_chunk), [c] their row numbers -> [c, m] int64 ascending
        ranks of their positives (0 = nearest; ``_BEYOND`` for padding and for ranks too far
        down to matter)."""
        if self.buffer is None or len(self.buffer) < len(q):
            self.buffer = self.reference.new_empty((len(q), len(self.reference)))
        block = torch.mm(q, self.reference.T, out=self.buffer[: len(q)])  # [c, Nr]
        if self.single:
            block[torch.arange(len(q), device=q.device), rows] = -torch.inf
        r = self.positives.r[rows]
        idx, valid = self.positives.table(rows)
        value = block.gather(1, idx)
        key = torch.where(valid, _rank_key(value, idx), _NO_KEY)
        key, order = key.sort(dim=1, descending=True)  # positives in ranking order, padding last
        m = key.shape[1] if self.map_at_r else 1  # without MAP@R only the first positive matters
        key, order = key[:, :m].contiguous(), order[:, :m]
        idx, valid, value = idx.gather(1, order), valid.gather(1, order), value.gather(1, order)

        listed = min(block.shape[1], max(min(self.max_k, _SHORT_LIST), int(r.max()) if self.map_at_r else 1))
        top_value, top_index = block.topk(listed, dim=1)
        top_key = _rank_key(top_value, top_index).sort(dim=1).values
        # The list holds every entry above its last value, so a positive above that value has
        # an exact rank: the number of listed entries with a larger key.
        rank = listed - torch.searchsorted(top_key, key, right=True)
        last = top_value[:, -1:]
        exact = valid & (value > last) if listed < block.shape[1] else valid
        rank = torch.where(exact, rank, _BEYOND)
        # Counted exactly in the block row where the list cannot tell: positives tied with its
        # last value that MAP@R needs (slot < R), and first positives below the list when
        # Recall@K looks deeper than the list goes.
        slot = torch.arange(m, device=key.device)
        recount = valid & ~exact & (value == last) & (slot < r[:, None])
        if listed < self.max_k:
            recount[:, 0] |= valid[:, 0] & ~exact[:, 0]
        wanted = recount.nonzero()
        for at in wanted.split(self.rows_per_chunk) if len(wanted) else ():
            i, j = at[:, 0], at[:, 1]
            rank[i, j] = _count_before(block[i], value[i, j], idx[i, j])
        return rank


class _SymmetricRanker:
    """Single-set ranks from the blocks of X Xᵀ, each unordered pair of blocks once (module
    docstring): rows grouped by class, every class inside one block of at most ``side`` rows.

    Per query row: the keys of its positives (read in its diagonal block, which comes first:
    ``fastiaa.blocks.block_pairs``, sorted), and per positive the number of references ranked
    before it, counted in every block that holds the row, on the row side or the column side. A
    count stops mattering once it reaches its cap (max(max K, R) for the first positive, R for
    the others, 0 without MAP@R): a row's *floor* is the similarity of its lowest positive still
    under its cap. Only the entries at or above a floor are keyed and counted, exactly; the
    rest of a block costs one comparison per side.

    Memory: the padded block and its two gathers (``fastiaa.blocks.PaddedProduct``), the
    comparison masks, and four ``[N, max R]`` tables.
    """

    def __init__(self, x: torch.Tensor, positives: _Positives, max_k: int, map_at_r: bool):
        n, device = len(x), x.device
        self.positives = positives
        self.order = positives.members  # [N] rows grouped by label: a class is contiguous
        ends = np.cumsum(positives.count.cpu().numpy())
        side = even_side(n, self.side(), slack=int(positives.count.max()) - 1)
        self.bounds = [0]
        while self.bounds[-1] < n:  # blocks of whole classes, at most `side` rows each
            self.bounds.append(int(ends[np.searchsorted(ends, self.bounds[-1] + side, side="right") - 1]))
        self.groups = [self.order[lo:hi] for lo, hi in zip(self.bounds[:-1], self.bounds[1:])]
        self.product = PaddedProduct(x, side)
        self.inverse = torch.empty_like(self.order)
        self.inverse[self.order] = torch.arange(n, device=device)

        r = positives.r[self.order]  # [N] R per row, in block order
        self.width = max(positives.max_r, 1) if map_at_r else 1
        slot = torch.arange(self.width, device=device)
        first = torch.clamp(r, min=max_k) if map_at_r else torch.full_like(r, max_k)
        rest = r if map_at_r else torch.zeros_like(r)
        self.cap = torch.where(slot < r[:, None], torch.where(slot == 0, first[:, None], rest[:, None]), 0)
        self.key = torch.full((n, self.width), _TOP_KEY, dtype=torch.int64, device=device)
        self.value = torch.full((n, self.width), torch.inf, device=device)
        self.count = torch.zeros((n, self.width), dtype=torch.int64, device=device)
        self.floor = torch.full((n,), torch.inf, device=device)

    @staticmethod
    def side() -> int:
        """Rows of a block (the working-memory budget: 16 blocks' worth, for the temporaries);
        the largest class must fit in one."""
        return padded(memory.block_side(parts=16))

    def chunks(self, n: int):
        return ((0, n),)  # one pass serves every query

    def ranks(self, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Same contract as ``_TorchRanker.ranks`` for the one chunk, every query (``q`` is the
        embeddings given at construction)."""
        for g, h in block_pairs(len(self.groups)):
            block = self.product(self.groups[g], self.groups[h])
            left, right = slice(*self.bounds[g:g + 2]), slice(*self.bounds[h:h + 2])
            if g == h:
                block.diagonal().fill_(-torch.inf)  # the query itself is no reference
                self._thresholds(block, left)
            self._count(block, left, right)
        rank = torch.where(self.count < self.cap, self.count, _BEYOND)
        out = torch.empty_like(rank)
        out[self.order] = rank
        return out

    def _thresholds(self, block: torch.Tensor, rows: slice) -> None:
        """The keys of the positives of ``rows``, read in their diagonal block, sorted."""
        idx, valid = self.positives.table(self.order[rows])
        local = torch.where(valid, self.inverse[idx] - rows.start, 0)
        value = block.gather(1, local)
        key = torch.where(valid, _rank_key(value, idx), _NO_KEY)
        key, order = key.sort(dim=1, descending=True)
        width = min(self.width, key.shape[1])
        key, value = key[:, :width], value.gather(1, order[:, :width])
        kept = key != _NO_KEY
        self.key[rows, :width] = torch.where(kept, key, _TOP_KEY)
        self.value[rows, :width] = torch.where(kept, value, torch.inf)
        self._lift(rows)

    def _count(self, block: torch.Tensor, rows: slice, columns: slice) -> None:
        """Count, for the query rows on both sides of ``block`` (the similarities of ``rows`` to
        ``columns``; one side on the diagonal), the entries ranked before each positive, where
        the row's floor admits them."""
        i, j = entries(block, self.floor[rows][:, None], above=True)  # row side
        at, reference, value = rows.start + i, columns.start + j, block[i, j]
        if rows != columns:  # column side: the same entries seen from the other group's rows
            i, j = entries(block, self.floor[columns][None, :], above=True)
            at, reference = torch.cat([at, columns.start + j]), torch.cat([reference, rows.start + i])
            value = torch.cat([value, block[i, j]])
        if len(at):
            above = _rank_key(value, self.order[reference])[:, None] > self.key[at]
            self.count.index_add_(0, at, above.long())
            self._lift(rows)
            self._lift(columns)

    def _lift(self, at: slice) -> None:
        """Floors of the rows ``at``: the similarity of their lowest positive under its cap."""
        alive = (self.count[at] < self.cap[at]).sum(1)
        lowest = self.value[at].gather(1, (alive - 1).clamp(min=0)[:, None]).squeeze(1)
        self.floor[at] = torch.where(alive > 0, lowest, torch.inf)


class _FaissRanker:
    """Positives' ranks from faiss neighbour lists (module docstring)."""

    def __init__(self, reference, positives: _Positives, single: bool, max_k: int, map_at_r: bool, length: int,
                 gpu: torch.device | None):
        import faiss

        self.exact_ranker = _TorchRanker(reference, positives, single, max_k, map_at_r)
        self.positives, self.single, self.map_at_r = positives, single, map_at_r
        self.length = length
        self.probe = self.length < len(reference) - int(single)  # one more shows if the list ends in a tie
        self.search_k = min(len(reference), self.length + int(self.probe) + int(single))
        self.rows_per_chunk = max(1, memory.block_elements(parts=8) // self.search_k)
        index = faiss.IndexFlatIP(reference.shape[1])
        index.add(reference.cpu().numpy())
        if gpu is not None:  # on this device only (under DDP each rank owns one GPU)
            index = faiss.index_cpu_to_gpu(gpu_resources(gpu.index), gpu.index, index)
        self.index = index

    def chunks(self, n: int):
        return ((s, min(s + self.rows_per_chunk, n)) for s in range(0, n, self.rows_per_chunk))

    def ranks(self, q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Same contract as ``_TorchRanker.ranks``."""
        value, index = (torch.from_numpy(a).to(q.device) for a in self.index.search(q.cpu().numpy(), self.search_k))
        key = _rank_key(value, index)
        if self.single:
            key = key.masked_fill(index == rows[:, None], _NO_KEY)
        order = key.sort(dim=1, descending=True).indices[:, : self.length + int(self.probe)]
        value, index = value.gather(1, order), index.gather(1, order)
        codes = self.positives.r_codes[index[:, : self.length]]
        hit = codes == self.positives.q_codes[rows][:, None]
        slot = torch.arange(self.length, device=q.device)
        m = max(int(self.positives.r[rows].max()), 1) if self.map_at_r else 1
        rank = _fit(torch.where(hit, slot, _BEYOND).topk(min(m, self.length), dim=1, largest=False).values, m)
        if self.probe:  # lists that end inside a tie: those rows again, exactly
            tie = (value[:, self.length - 1] == value[:, self.length]).nonzero().squeeze(1)
            for part in tie.split(self.exact_ranker.rows_per_chunk) if len(tie) else ():
                rank[part] = _fit(self.exact_ranker.ranks(q[part], rows[part]), m)
        return rank


_GPU_RESOURCES: dict = {}


def gpu_resources(device_index: int):
    """The process's one ``faiss.StandardGpuResources`` of a GPU, created on first use with its
    temporary memory bounded by the working-memory budget (``fastiaa.memory``), then reused."""
    if device_index not in _GPU_RESOURCES:
        import faiss

        resources = faiss.StandardGpuResources()
        resources.setTempMemory(memory.block_elements(parts=1) * 4)
        _GPU_RESOURCES[device_index] = resources
    return _GPU_RESOURCES[device_index]


class _Totals:
    """Running sums of the metrics over chunks of queries, from the positives' ranks."""

    def __init__(self, ks: tuple[int, ...], map_at_r: bool):
        self.ks, self.map_at_r = ks, map_at_r
        self.hits = dict.fromkeys(ks, 0)
        self.ap = self.rp = 0.0
        self.with_positive = 0

    def add(self, rank: torch.Tensor, r: torch.Tensor) -> None:
        """rank [c, m] ascending ranks of each query's positives, r [c] the queries' R."""
        for k in self.ks:
            self.hits[k] += int((rank[:, 0] < k).sum())
        has = r > 0
        self.with_positive += int(has.sum())
        if self.map_at_r:
            counted = rank < r[:, None]  # the i-th positive lies in the top R
            position = torch.arange(1, rank.shape[1] + 1, device=rank.device, dtype=torch.float64)
            precision = torch.where(counted, position / (torch.where(counted, rank, 0) + 1), 0.0)
            self.ap += float((precision.sum(1)[has] / r[has]).sum())
            self.rp += float((counted.sum(1)[has].double() / r[has]).sum())

    def result(self, num_queries: int) -> dict:
        out = {f"recall@{k}": self.hits[k] / num_queries for k in self.ks}
        lone = num_queries - self.with_positive
        if lone:
            warnings.warn(
                f"{lone} of {num_queries} queries have no positive in the reference set: "
                "they count as misses in Recall@K and are left out of MAP@R and R-Precision",
                stacklevel=3,
            )
        if self.map_at_r:
            out["map@r"] = self.ap / self.with_positive if self.with_positive else float("nan")
            out["r_precision"] = self.rp / self.with_positive if self.with_positive else float("nan")
        out["num_queries"] = num_queries
        return out
