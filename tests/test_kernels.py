"""fastiaa.kernels (Triton kernels + dispatch) and fastiaa.iaa.lowrank, on the CPU.

How the Triton kernels are tested without a GPU
-----------------------------------------------
Triton runs kernels on CPU tensors only in its interpreter, which is selected by the
environment variable ``TRITON_INTERPRET=1`` when ``@triton.jit`` decorates a kernel, i.e.
when ``fastiaa.kernels`` is first imported. Other test modules import it (through
``fastiaa.iaa``) without the variable in the same pytest process, so the interpreter
tests cannot run there. They live in this module, marked ``interpret``: in the normal
pytest process they are skipped and ``test_triton_kernels_in_interpreter`` runs this very
module in a child pytest process with ``TRITON_INTERPRET=1``, where only they run (the
PyTorch-only tests are skipped there, so nothing runs twice). A failure in the child
prints its report.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from fastiaa import kernels
from fastiaa.kernels import LowRankFactor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
interpret = pytest.mark.skipif(not INTERPRET, reason="runs in the TRITON_INTERPRET=1 child process")
torch_only = pytest.mark.skipif(INTERPRET, reason="PyTorch-only test, runs in the parent process")
# the backend a test's kernel calls take: Triton in the interpreter child, PyTorch here
HERE = "triton" if INTERPRET else "torch"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a − e| / max |e| (float64)."""
    expected = expected.double()
    return float((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


# ---------------------------------------------------------------- float64 transcription of Eq. 7-8

def spec_moments(x: torch.Tensor, labels: torch.Tensor, num_classes: int, full: bool):
    """Spec §3 by the book, one class at a time in float64: count, mean, Σ (x−μ)(x−μ)^T."""
    x = x.double()
    dim = x.shape[1]
    count = torch.zeros(num_classes, dtype=torch.int64)
    mean = torch.zeros(num_classes, dim, dtype=torch.float64)
    m2 = torch.zeros((num_classes, dim, dim) if full else (num_classes, dim), dtype=torch.float64)
    for k in range(num_classes):
        rows = x[labels == k]
        count[k] = rows.shape[0]
        if rows.shape[0] == 0:
            continue
        mean[k] = rows.mean(0)
        centred = rows - mean[k]
        m2[k] = centred.T @ centred if full else (centred * centred).sum(0)
    return count, mean, m2


def odd_problem(num=29, dim=37, num_classes=7, dtype=torch.float32, seed=0):
    """Unsorted labels with an absent class (5), a singleton class (2) and uneven classes."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.tensor([0, 1, 3, 4, 6] * 5 + [2, 0, 6, 1])[:num]
    labels = labels[torch.randperm(num, generator=gen)]
    labels[labels == 2] = 3
    labels[0] = 2
    x = 3.0 + 2.0 * torch.randn(num, dim, generator=gen, dtype=torch.float64)
    return x.to(dtype), labels, num_classes


# ---------------------------------------------------------------- dispatch

@torch_only
def test_dispatch_rules():
    x = torch.zeros(3, 2)
    # CPU tensors never go to Triton outside the interpreter
    assert not any(kernels.use_triton(name, x) for name in ("auto", "triton", "torch"))
    with pytest.raises(ValueError, match="one of"):
        kernels.use_triton("cuda", x)
    with pytest.raises(ValueError, match="one of"):
        kernels.check_backend("cuda")


@interpret
def test_dispatch_interpreter():
    x = torch.zeros(3, 2)
    assert not kernels.use_triton("auto", x)  # "auto" keeps CPU tensors on PyTorch
    assert kernels.use_triton("triton", x) and not kernels.use_triton("torch", x)


@torch_only
def test_imports_and_runs_without_triton():
    """A machine where ``import triton`` fails: the module imports and everything runs on PyTorch."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from fastiaa import kernels\n"
        "assert not kernels.triton_available() and not kernels.use_triton('auto', torch.zeros(1))\n"
        "try:\n"
        "    kernels.check_backend('triton')\n"
        "    raise SystemExit('check_backend(triton) must fail without triton')\n"
        "except ValueError as exc:\n"
        "    assert '--kernels torch' in str(exc)\n"
        "count, mean, m2 = kernels.class_moments(torch.ones(3, 2), torch.tensor([0, 1, 1]), 2, True)\n"
        "assert count.tolist() == [1, 2] and float(m2.abs().max()) == 0.0\n"
        "out = kernels.synthesize(torch.zeros(2, 2), torch.tensor([0, 1]), torch.ones(2, 2), 1.0, 3)\n"
        "assert out.shape == (3, 2, 2)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@torch_only
def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, report
    assert " passed" in proc.stdout and "skipped" in proc.stdout, report


# ---------------------------------------------------------------- class moments

def _check_moments(x, labels, num_classes, full, tol=1e-5, backend=HERE):
    count, mean, m2 = kernels.class_moments(x, labels, num_classes, full, backend)
    e_count, e_mean, e_m2 = spec_moments(x, labels, num_classes, full)
    assert count.dtype == torch.int64 and mean.dtype == m2.dtype == torch.float32
    assert torch.equal(count, e_count)
    assert rel_err(mean, e_mean) < tol
    assert rel_err(m2, e_m2) < tol
    return count, mean, m2


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dim", [37, 130])  # one and several feature blocks, not powers of two
def test_moments_match_spec_torch(full, dim):
    if INTERPRET:
        pytest.skip("PyTorch path: parent process")
    x, labels, c = odd_problem(dim=dim)
    count, mean, m2 = _check_moments(x, labels, c, full)
    assert count[5] == 0 and count[2] == 1 and float(m2[2].abs().max()) == 0.0 and float(mean[5].abs().max()) == 0.0


@interpret
@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("dim", [37, 130])
def test_moments_triton_match_spec_and_torch(full, dim):
    x, labels, c = odd_problem(dim=dim)
    got = _check_moments(x, labels, c, full)
    again = kernels.class_moments(x, labels, c, full, "triton")
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic, bit for bit
    ref = kernels.class_moments(x, labels, c, full, "torch")
    assert torch.equal(got[0], ref[0])
    assert rel_err(got[1], ref[1]) < 1e-6 and rel_err(got[2], ref[2]) < 1e-5
    if full:  # the off-diagonal blocks are written once and mirrored: exactly symmetric
        assert torch.equal(got[2], got[2].transpose(1, 2))


@interpret
@pytest.mark.parametrize("full", [False, True])
def test_moments_triton_one_class_and_low_precision(full):
    x, _, _ = odd_problem(num=21, dim=19)
    _check_moments(x, torch.zeros(21, dtype=torch.int64), 1, full)
    # bfloat16 input, float32 accumulation: exact against Eq. 7-8 applied to the rounded input
    x16, labels, c = odd_problem(num=23, dim=19, dtype=torch.bfloat16)
    _check_moments(x16, labels, c, full)


@interpret
def test_statistics_fold_the_kernel_moments():
    """DenseStatistics.update with the Triton moments equals the PyTorch path (same contract)."""
    from fastiaa.iaa import DenseStatistics

    x, labels, c = odd_problem(dim=37)
    ref, got = DenseStatistics(c, 37, "full"), DenseStatistics(c, 37, "full")
    ref.update(x, labels, backend="auto")  # "auto": PyTorch for CPU tensors
    got.update(x, labels, backend="triton")
    assert torch.equal(got.count, ref.count) and rel_err(got.mean, ref.mean) < 1e-6
    assert rel_err(got.covariance(), ref.covariance()) < 1e-5


@torch_only
def test_moments_bad_input():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        kernels.class_moments(x, torch.tensor([0, 1, 2, 0]), 2, False)
    with pytest.raises(ValueError, match="one label per embedding"):
        kernels.class_moments(x, torch.tensor([0, 1]), 2, False)
    with pytest.raises(ValueError, match="integer"):
        kernels.class_moments(x, torch.zeros(4), 2, False)
    with pytest.raises(ValueError, match="NaN or Inf"):
        kernels.class_moments(torch.full((4, 3), float("nan")), torch.zeros(4, dtype=torch.long), 2, False)


# ---------------------------------------------------------------- synthesis

def tiny_lowrank(num_classes=4, dim=13, seed=1, counts=(3, 0, 1, 20)) -> LowRankFactor:
    """A LowRankFactor with uneven entry lists (one class without entries, one with > 16)."""
    gen = torch.Generator().manual_seed(seed)
    counts_t = torch.tensor(counts[:num_classes])
    total = int(counts_t.sum())
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts_t.cumsum(0)])
    rows = torch.randn(9, dim, generator=gen)
    glob = torch.linalg.cholesky(torch.eye(dim) + 0.3 * torch.ones(dim, dim))
    return LowRankFactor(
        rows=rows, entry_ptr=ptr, entry_row=torch.randint(0, 9, (total,), generator=gen),
        entry_coef=torch.rand(total, generator=gen) + 0.1, global_factor=glob,
        global_coef=torch.rand(num_classes, generator=gen), max_entries=int(counts_t.max()),
    )


def _triton_noise(z_shape, labels, factor_like: LowRankFactor, num, seed):
    """The kernel's ε [num, B, D] and η [num, B, max_entries] for a low-rank factor's layout,
    read back through probe factors (unit-vector rows / identity global factor)."""
    dim = z_shape[1]
    width = factor_like.max_entries
    assert width <= dim, "the probe reads η through D output coordinates"
    zeros = torch.zeros(z_shape)
    num_classes = factor_like.num_classes
    counts = factor_like.entry_ptr[1:] - factor_like.entry_ptr[:-1]
    position = torch.arange(int(counts.sum())) - torch.repeat_interleave(factor_like.entry_ptr[:-1], counts)
    probe_eta = LowRankFactor(torch.eye(dim), factor_like.entry_ptr, position, torch.ones(position.numel()),
                              torch.eye(dim), torch.zeros(num_classes), width)
    probe_eps = LowRankFactor(factor_like.rows, factor_like.entry_ptr, factor_like.entry_row,
                              torch.zeros(position.numel()), torch.eye(dim), torch.ones(num_classes), width)
    eps = kernels.synthesize(zeros, labels, probe_eps, 1.0, num, gen(seed), backend="triton")
    eta = kernels.synthesize(zeros, labels, probe_eta, 1.0, num, gen(seed), backend="triton")[..., :width]
    return eps.double(), eta.double()


@interpret
def test_synthesize_triton_exact_all_factor_forms():
    """Every output equals z + scale · L ε (float64) with the kernel's own Philox noise."""
    g = torch.Generator().manual_seed(3)
    num_classes, dim, batch, num, scale = 4, 21, 6, 3, 0.7
    z = torch.randn(batch, dim, generator=g)
    labels = torch.tensor([3, 0, 2, 3, 1, 0])
    std = torch.rand(num_classes, dim, generator=g)
    a = torch.randn(num_classes, dim, dim, generator=g)
    chol = torch.linalg.cholesky(a @ a.transpose(1, 2) / dim + 0.1 * torch.eye(dim))

    def draw(factor, zz=z, s=scale, **kw):
        return kernels.synthesize(zz, labels, factor, s, num, gen(11), backend="triton", **kw)

    eps = draw(torch.ones(num_classes, dim), torch.zeros(batch, dim), 1.0).double()
    assert abs(float(eps.mean())) < 0.2 and abs(float(eps.std()) - 1.0) < 0.2  # it is noise

    diag = draw(std)
    assert rel_err(diag, z.double() + scale * std.double()[labels] * eps) < 1e-6
    quirk = draw(std, repeated_sqrt=True)  # sample m (0-based) uses std^(2^-m)
    powers = (2.0 ** -torch.arange(num, dtype=torch.float64)).view(-1, 1, 1)
    assert rel_err(quirk, z.double() + scale * std.double()[labels] ** powers * eps) < 1e-5
    full = draw(chol)
    expect = z.double() + scale * torch.einsum("bij,mbj->mbi", chol.double()[labels], eps)
    assert rel_err(full, expect) < 1e-5
    # A diagonal Cholesky factor reproduces the diagonal draw: same counters, same ε.
    assert rel_err(draw(torch.diag_embed(std)), diag) < 1e-6

    low = tiny_lowrank(num_classes, dim)
    eps_l, eta = _triton_noise((batch, dim), labels, low, num, 11)
    got = draw(low)
    start = low.entry_ptr[labels]
    expect = torch.empty(num, batch, dim, dtype=torch.float64)
    for b in range(batch):
        k = int(labels[b])
        e = torch.arange(int(start[b]), int(low.entry_ptr[k + 1]))
        vec = low.rows.double()[low.entry_row[e]] * low.entry_coef.double()[e, None]
        expect[:, b] = (eta[:, b, : e.numel()] @ vec
                        + float(low.global_coef[k]) * eps_l[:, b] @ low.global_factor.double().T)
    assert rel_err(got, z.double() + scale * expect) < 1e-5


@interpret
def test_synthesize_triton_seeded_and_gradient():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(5, 21, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 1, 0, 2])
    std = torch.rand(3, 21, generator=g)

    def draw(source, factor=std):
        return kernels.synthesize(z, labels, factor, 0.5, 2, source, backend="triton")

    source, replay = gen(123), gen(123)
    a = draw(source)
    assert a.shape == (2, 5, 21) and a.dtype == z.dtype
    kernels.draw_seed(replay)
    assert torch.equal(source.get_state(), replay.get_state())  # one host draw keys the whole launch
    assert torch.equal(a, draw(gen(123))) and not torch.equal(a, draw(gen(124)))
    upstream = torch.randn(2, 5, 21, generator=g)
    (a * upstream).sum().backward()
    assert torch.allclose(z.grad, upstream.sum(0))
    chol = torch.diag_embed(std).requires_grad_(True)
    draw(gen(1), chol).sum().backward()
    assert chol.grad is None  # the factor gets no gradient


def _sample_covariance(samples: torch.Tensor) -> torch.Tensor:
    flat = samples.reshape(-1, samples.shape[-1]).double()
    centred = flat - flat.mean(0)
    return centred.T @ centred / (flat.shape[0] - 1)


@pytest.mark.parametrize("form", ["diag", "full", "lowrank"])
def test_synthesize_statistics(form):
    """Mean z and covariance scale²Σ over many draws (Triton in the child, PyTorch here)."""
    g = torch.Generator().manual_seed(5)
    dim, batch, num, scale = 5, 75, 64, 0.8  # few rows: the interpreter runs one program per row
    z0 = torch.randn(dim, generator=g)
    z = z0.expand(batch, dim).contiguous()
    labels = torch.full((batch,), 1)
    a = torch.randn(2, dim, dim, generator=g)
    cov = a @ a.transpose(1, 2) / dim + 0.2 * torch.eye(dim)
    if form == "diag":
        factor, sigma = cov.diagonal(dim1=1, dim2=2).sqrt(), torch.diag(cov[1].diagonal())
    elif form == "full":
        factor, sigma = torch.linalg.cholesky(cov), cov[1]
    else:
        factor = tiny_lowrank(2, dim, counts=(2, 7))
        sigma = factor.covariance()[1]
    out = kernels.synthesize(z, labels, factor, scale, num, gen(9), backend=HERE)
    n = num * batch
    spread = math.sqrt(float(sigma.diagonal().max()))
    assert float((out.reshape(-1, dim).double().mean(0) - z0).abs().max()) < 4 * scale * spread / math.sqrt(n)
    target = scale**2 * sigma.double()
    assert rel_err(_sample_covariance(out), target) < 0.1  # ~ 3 standard errors at n = 4800


@torch_only
def test_synthesize_torch_path():
    g = torch.Generator().manual_seed(6)
    z = torch.randn(4, 6, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    std = torch.rand(2, 6, generator=g)
    out = kernels.synthesize(z, labels, std, 0.3, 3, gen(77))
    eps = torch.randn(3, 4, 6, generator=gen(77))  # CPU tensors: the generator's own stream
    assert torch.allclose(out, z + 0.3 * std[labels] * eps)
    out.sum().backward()
    assert torch.allclose(z.grad, torch.full_like(z, 3.0))
    low = tiny_lowrank(2, 6, counts=(3, 5))
    got = kernels.synthesize(z.detach(), labels, low, 0.3, 3, gen(78))
    replay = gen(78)
    eps = torch.randn(3, 4, 6, generator=replay)
    eta = torch.randn(3, 4, 5, generator=replay)  # W = 5 entries: the widest list of the batch
    for b in range(4):
        k = int(labels[b])
        e = torch.arange(int(low.entry_ptr[k]), int(low.entry_ptr[k + 1]))
        vec = low.rows[low.entry_row[e]] * low.entry_coef[e, None]
        want = eta[:, b, : e.numel()] @ vec + float(low.global_coef[k]) * eps[:, b] @ low.global_factor.T
        torch.testing.assert_close(got[:, b], z[b].detach() + 0.3 * want)
    with pytest.raises(ValueError, match="embedding size"):
        kernels.synthesize(z, labels, torch.rand(2, 5), 0.3, 3)
    with pytest.raises(ValueError, match="num"):
        kernels.synthesize(z, labels, std, 0.3, 0)


# ---------------------------------------------------------------- low-rank full covariance (fastiaa.iaa.lowrank)

def refresh_problem(seed, num_classes=13, dim=6):
    """Embeddings of one refresh: class sizes 0..9 (class 4 absent, classes 1 and 7 singletons)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor([5, 1, 8, 3, 0, 9, 2, 1, 6, 4, 7, 3, 5])[:num_classes]
    labels = torch.repeat_interleave(torch.arange(num_classes), sizes)
    labels = labels[torch.randperm(labels.numel(), generator=g)]
    centres = torch.randn(num_classes, dim, generator=g)
    spread = 0.3 + torch.rand(num_classes, dim, generator=g)
    x = centres[labels] + spread[labels] * torch.randn(labels.numel(), dim, generator=g)
    return x, labels, num_classes


def _fold_both(max_history=None, refreshes=3):
    from fastiaa.iaa import DenseStatistics, LowRankStatistics

    x, labels, c = refresh_problem(0)
    dense = DenseStatistics(c, x.shape[1], covariance="full")
    low = LowRankStatistics(c, x.shape[1], max_history=max_history)
    for seed in range(refreshes):
        x, labels, _ = refresh_problem(seed)
        keep = labels != 12 if seed == 1 else slice(None)  # class 12 absent from one refresh
        dense.update(x[keep], labels[keep])
        low.update(x[keep], labels[keep])
    return dense, low


@torch_only
def test_lowrank_fold_equals_dense_fold():
    from fastiaa.iaa import LowRankStatistics

    dense, low = _fold_both()
    assert rel_err(low.covariance(), dense.covariance()) < 1e-5
    assert rel_err(low.diagonal(), dense.covariance().diagonal(dim1=1, dim2=2)) < 1e-5
    assert torch.equal(low.class_size, dense.class_size) and rel_err(low.mean, dense.mean) < 1e-6
    restored = LowRankStatistics(low.num_classes, low.dim)
    restored.load_state_dict(low.state_dict())
    assert torch.equal(restored.covariance(), low.covariance()) and restored.max_history is None


@torch_only
def test_lowrank_history_truncation_bound():
    """max_history = H drops a PSD remainder of weight <= momentum^H (module doc)."""
    dense, low = _fold_both(max_history=1, refreshes=2)
    gap = dense.covariance().double() - low.covariance().double()
    assert float(torch.linalg.eigvalsh(gap).min()) > -1e-5        # the kept part never exceeds the fold
    old, _ = _fold_both(refreshes=1)
    bound = 0.2 * torch.linalg.matrix_norm(old.covariance().double(), ord=2)
    assert bool((torch.linalg.matrix_norm(gap, ord=2) <= bound + 1e-5).all())
    assert low.rows.shape[0] < _fold_both(refreshes=2)[1].rows.shape[0]


@torch_only
def test_lowrank_inner_products_and_correction_match_reference():
    from fastiaa.iaa import neighbor_correction

    dense, low = _fold_both()
    cov = dense.covariance().double()
    assert rel_err(low.covariance_inner_products(), torch.einsum("iab,jab->ij", cov, cov)) < 1e-5
    expected = neighbor_correction(dense.mean, dense.covariance(), dense.class_size, num_neighbors=4)
    factor = low.corrected(num_neighbors=4, jitter=1e-9)
    assert rel_err(factor.covariance(), expected) < 1e-5
    assert factor.covariance()[4].abs().max() == 0  # a class never seen keeps covariance 0
    plain = low.corrected(num_neighbors=4, tau=1)  # α = 0 everywhere: the uncorrected factor
    assert float(plain.global_coef.abs().max()) == 0.0
    assert rel_err(plain.covariance(), low.factor(None).covariance()) < 1e-6
    assert rel_err(low.factor(None).covariance(), dense.covariance()) < 1e-5
    # few-sample classes really were corrected (not a no-op)
    assert rel_err(low.covariance(), expected) > 1e-2


@torch_only
def test_lowrank_correction_on_many_blocks_matches_dense():
    """40 classes in 16-class blocks (inner products read, not recomputed): the dense result."""
    from fastiaa import memory
    from fastiaa.iaa import DenseStatistics, LowRankStatistics, neighbor_correction

    g = torch.Generator().manual_seed(3)
    labels = torch.repeat_interleave(torch.arange(40), torch.randint(0, 7, (40,), generator=g))
    x = torch.randn(40, 5, generator=g)[labels] + 0.5 * torch.randn(labels.numel(), 5, generator=g)
    dense, low = DenseStatistics(40, 5, covariance="full"), LowRankStatistics(40, 5, max_history=None)
    dense.update(x, labels)
    low.update(x, labels)
    expected = neighbor_correction(dense.mean, dense.covariance(), dense.class_size, num_neighbors=3)
    with memory.work_memory(0.001):
        factor = low.corrected(num_neighbors=3, jitter=1e-9)
    assert rel_err(factor.covariance(), expected) < 1e-5


def test_lowrank_samples_match_dense_corrected_covariance():
    """Draws from the low-rank factor have the reference's dense corrected covariance (both backends)."""
    from fastiaa.iaa import neighbor_correction

    dense, low = _fold_both()
    expected = neighbor_correction(dense.mean, dense.covariance(), dense.class_size, num_neighbors=4)
    factor = low.corrected(num_neighbors=4, jitter=1e-9)
    batch, num, scale = 24, 200, 0.9  # few rows, many samples: the interpreter runs a program per row
    for k in (1, 6):  # a singleton class (α = 1) and a class of 2
        labels = torch.full((batch,), k)
        out = kernels.synthesize(torch.zeros(batch, low.dim), labels, factor, scale, num, gen(21 + k), backend=HERE)
        assert rel_err(_sample_covariance(out), scale**2 * expected[k]) < 0.1


def test_iaa_lowrank_draws_have_the_corrected_covariance():
    """fastiaa.IAA with the low-rank form: draws with mean z and covariance λ Σ'_k, Σ'_k the dense
    reference correction (neighbor_correction of the dense fold); one dispatch, either backend."""
    from fastiaa import IAA
    from fastiaa.iaa import neighbor_correction

    dense, _ = _fold_both(refreshes=1)
    x, labels, c = refresh_problem(0)
    iaa = IAA(c, x.shape[1], epochs=10, start_epoch=0, covariance="lowrank", correction="on", num_neighbor=4,
              intra_lamda=0.64, aug_num=200, backend=HERE, seed=8)
    iaa.fold(x, labels)
    expected = neighbor_correction(dense.mean, dense.covariance(), dense.class_size, num_neighbors=4)[6].double()
    z0 = torch.linspace(-1.0, 2.0, x.shape[1])
    batch, lam = 24, 0.64
    out = iaa.synthesize(z0.expand(batch, -1), torch.full((batch,), 6), epoch=1)
    assert out.shape == (200, batch, x.shape[1]) and out.dtype == torch.float32
    spread = math.sqrt(lam * float(expected.diagonal().max()))
    assert float((out.reshape(-1, x.shape[1]).double().mean(0) - z0).abs().max()) < 4 * spread / math.sqrt(200 * batch)
    assert rel_err(_sample_covariance(out), lam * expected) < 0.1


@torch_only
def test_synthesize_lowrank_rejects_bad_input():
    _, low = _fold_both()
    factor = low.corrected(num_neighbors=4)
    z = torch.zeros(2, low.dim)
    with pytest.raises(ValueError, match="diagonal"):
        kernels.synthesize(z, torch.tensor([0, 1]), factor, 0.5, 2, repeated_sqrt=True)
    with pytest.raises(ValueError, match="dimension"):
        kernels.synthesize(torch.zeros(2, low.dim + 1), torch.tensor([0, 1]), factor, 0.5, 2)
    with pytest.raises(ValueError, match=rf"\[0, {low.num_classes}\)"):
        kernels.synthesize(z, torch.tensor([0, low.num_classes]), factor, 0.5, 2)
    with pytest.raises(ValueError, match="num"):
        kernels.synthesize(z, torch.tensor([0, 1]), factor, 0.5, 0)


@torch_only
def test_every_launch_runs_under_its_tensors_device(monkeypatch):
    """A kernel whose tensors sit on cuda:1 launches inside torch.cuda.device(cuda:1), whatever the
    current device (without it, the first launch on another GPU than the current one fails)."""
    import contextlib

    from fastiaa.kernels import _dispatch

    class OnSecondGpu(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    entered, ran = [], []

    @contextlib.contextmanager
    def device_guard(device):
        entered.append(device)
        yield
        entered.append("exit")

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **meta: ran.append((grid, entered[-1], meta))

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    _dispatch.launch(Kernel(), (3, 1), 7, torch.zeros(2).as_subclass(OnSecondGpu), BLOCK=4)
    assert ran == [((3, 1), torch.device("cuda", 1), {"BLOCK": 4})] and entered[-1] == "exit"
    _dispatch.launch(Kernel(), (1,), torch.zeros(2))  # CPU tensors (the interpreter): no CUDA guard
    assert ran[-1][1] == "exit"


# ---------------------------------------------------------------- compiled kernels on a GPU (pytest -m gpu)

GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("full", [False, True], ids=["diag", "full"])
def test_gpu_moments_match_float64(full, dtype):
    x, labels, c = odd_problem(num=200, dim=130, num_classes=7, dtype=dtype)
    got = kernels.class_moments(x.cuda(), labels.cuda(), c, full, "triton")
    want = spec_moments(x, labels, c, full)  # the rounded input, float64
    assert torch.equal(got[0].cpu(), want[0])
    assert rel_err(got[1].cpu(), want[1]) < 1e-5 and rel_err(got[2].cpu(), want[2]) < 1e-4
    again = kernels.class_moments(x.cuda(), labels.cuda(), c, full, "triton")
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic: no atomics


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("form", ["diag", "full", "lowrank"])
def test_gpu_synthesis_matches_float64(form, dtype):
    """z + scale · L ε with the kernel's own noise (read back through probe factors), float64."""
    g = torch.Generator().manual_seed(3)
    classes, dim, batch, num, scale = 4, 512, 12, 3, 0.7
    z = torch.randn(batch, dim, generator=g).to(dtype)
    labels = torch.randint(0, classes, (batch,), generator=g)
    std = torch.rand(classes, dim, generator=g)
    a = torch.randn(classes, dim, dim, generator=g)
    chol = torch.linalg.cholesky(a @ a.transpose(1, 2) / dim + 0.1 * torch.eye(dim))
    low = tiny_lowrank(classes, dim, counts=(3, 0, 1, 20))

    def draw(factor, zz):
        factor = factor.to("cuda") if isinstance(factor, LowRankFactor) else factor.cuda()
        return kernels.synthesize(zz.cuda(), labels.cuda(), factor, scale, num, gen(11), backend="triton").cpu()

    eps = draw(torch.ones(classes, dim), torch.zeros(batch, dim)).double() / scale
    zd = z.double()
    if form == "diag":
        got, want = draw(std, z), zd + scale * std.double()[labels] * eps
    elif form == "full":
        got, want = draw(chol, z), zd + scale * torch.einsum("bij,mbj->mbi", chol.double()[labels], eps)
    else:
        got = draw(low, z)
        width = low.max_entries
        counts = low.entry_ptr[1:] - low.entry_ptr[:-1]
        position = torch.arange(int(counts.sum())) - torch.repeat_interleave(low.entry_ptr[:-1], counts)
        probe = LowRankFactor(torch.eye(dim), low.entry_ptr, position, torch.ones(position.numel()), torch.eye(dim),
                              torch.zeros(classes), width)
        eta = draw(probe, torch.zeros(batch, dim)).double()[..., :width] / scale
        probe_eps = LowRankFactor(low.rows, low.entry_ptr, low.entry_row, torch.zeros(position.numel()),
                                  torch.eye(dim), torch.ones(classes), width)
        eps_l = draw(probe_eps, torch.zeros(batch, dim)).double() / scale
        want = torch.empty(num, batch, dim, dtype=torch.float64)
        for b in range(batch):
            k = int(labels[b])
            e = torch.arange(int(low.entry_ptr[k]), int(low.entry_ptr[k + 1]))
            vec = low.rows.double()[low.entry_row[e]] * low.entry_coef.double()[e, None]
            want[:, b] = eta[:, b, : e.numel()] @ vec + float(low.global_coef[k]) * eps_l[:, b] @ low.global_factor.double().T
        want = zd + scale * want
    assert got.dtype == dtype and got.shape == (num, batch, dim)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # the output is stored in the embeddings' dtype
    assert rel_err(got, want) < tol
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1.0) < 0.05  # it is standard normal noise
