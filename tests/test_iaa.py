"""fastiaa.iaa (and the PyTorch paths of fastiaa.kernels) against float64 loop transcriptions of
docs/method.md §3-5, and the IAA object's schedule, forms and checkpoints."""
import math
import types

import pytest
import torch

from fastiaa import IAA, memory
from fastiaa.iaa import DenseStatistics, LowRankStatistics, cholesky_factor, lambda_schedule, neighbor_correction
from fastiaa.iaa._neighbors import nearest_candidates
from fastiaa.kernels import LowRankFactor, class_moments, draw_seed, synthesize

# ---------------------------------------------------------------- float64 references


def ref_fold(state, x, y, num_classes, momentum, full):
    """Spec §3, one class at a time, float64."""
    mean, cov, seen, size = (t.clone() for t in state)
    for c in range(num_classes):
        xs = x[y == c].double()
        n = xs.shape[0]
        if n == 0:
            continue
        mu_new = xs.mean(0)
        dev = xs - mu_new
        cov_new = dev.T @ dev / n if full else (dev * dev).mean(0)
        w = max(n / (n + float(seen[c])), 1 - momentum)
        delta = mean[c] - mu_new
        spread = torch.outer(delta, delta) if full else delta * delta
        cov[c] = (1 - w) * cov[c] + w * cov_new + w * (1 - w) * spread
        mean[c] = (1 - w) * mean[c] + w * mu_new
        seen[c] += n
        size[c] = n
    return mean, cov, seen, size


def ref_correct(mean, cov, n, k, beta=0.1, gamma=0.1, tau=40, sigma_m=1.0, sigma_cv=1.0,
                zero_mean=False, sentinel=False):
    """Spec §4 (Eq. 9-16) for one class after the other, float64, plain Python selection."""
    num_classes = len(n)
    mean, flat = mean.double().clone(), cov.double().reshape(num_classes, -1).clone()
    if zero_mean:
        for j in range(num_classes):
            if n[j] == 1:
                mean[j] = 0
                flat[j] = 0
    pool = [j for j in range(num_classes) if n[j] > 1]
    total = sum(n[j] for j in pool)
    glob = sum(n[j] * flat[j] for j in pool) / total if pool else torch.zeros_like(flat[0])
    out = flat.clone()
    for c in range(num_classes):
        alpha = 1 / (1 + math.log(1 + beta * (n[c] - 1))) if 1 <= n[c] < tau else 0.0
        cands = [j for j in pool if j != c]
        dm = [float(torch.linalg.norm(mean[c] ** 2 - mean[j] ** 2)) for j in range(num_classes)]
        dcv = [float(torch.linalg.norm(flat[c] - flat[j])) for j in range(num_classes)]
        if sentinel:
            row_m = [dm[j] + (0.0 if j in cands else 1e12) for j in range(num_classes)]
            lo_m, hi_m, lo_cv, hi_cv = min(row_m), max(row_m), min(dcv), max(dcv)
        elif cands:
            lo_m, hi_m = min(dm[j] for j in cands), max(dm[j] for j in cands)
            lo_cv, hi_cv = min(dcv[j] for j in cands), max(dcv[j] for j in cands)

        def norm(v, lo, hi):
            return (v - lo) / (hi - lo) if hi > lo else 0.0

        chosen = sorted(cands, key=lambda j: (dm[j], j))[:k]
        if chosen:
            ws = [n[j] * math.exp(-norm(dm[j], lo_m, hi_m) ** 2 / (2 * sigma_m**2)
                                  - norm(dcv[j], lo_cv, hi_cv) ** 2 / (2 * sigma_cv**2)) for j in chosen]
            nb = sum(w * flat[j] for w, j in zip(ws, chosen)) / sum(ws)
        else:
            nb = glob
        out[c] = (1 - alpha) * flat[c] + alpha * ((1 - gamma) * nb + gamma * glob)
    return out.reshape(cov.shape)


def make_state(num_classes, dim, full):
    shape = (num_classes, dim, dim) if full else (num_classes, dim)
    return (torch.zeros(num_classes, dim, dtype=torch.float64), torch.zeros(shape, dtype=torch.float64),
            torch.zeros(num_classes, dtype=torch.int64), torch.zeros(num_classes, dtype=torch.int64))


def random_stats(num_classes, dim, counts, full, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(num_classes, dim, generator=g)
    if full:
        a = torch.randn(num_classes, dim, dim, generator=g) * 0.3
        cov = a @ a.transpose(1, 2)
    else:
        cov = torch.rand(num_classes, dim, generator=g)
    return mean, cov, torch.tensor(counts)


# ---------------------------------------------------------------- §3 statistics


@pytest.mark.parametrize("full", [False, True])
def test_class_moments_match_loop(full):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 6, generator=g) * 3 + 10
    y = torch.randint(0, 7, (50,), generator=g)
    y[y == 3] = 4  # class 3 absent
    count, mean, m2 = class_moments(x, y, 9, full=full)
    assert count.dtype == torch.int64 and mean.dtype == torch.float32 and m2.dtype == torch.float32
    for c in range(9):
        xs = x[y == c].double()
        assert int(count[c]) == xs.shape[0]
        if xs.shape[0] == 0:
            assert float(mean[c].abs().sum()) == 0 and float(m2[c].abs().sum()) == 0
            continue
        dev = xs - xs.mean(0)
        want = dev.T @ dev if full else (dev * dev).sum(0)
        torch.testing.assert_close(mean[c].double(), xs.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m2[c].double(), want, rtol=1e-5, atol=1e-5)


def test_class_moments_stable_far_from_origin():
    # Mean 1e4, spread 1e-2: E[x^2] - E[x]^2 in float32 would lose everything.
    g = torch.Generator().manual_seed(2)
    x = 1e4 + 1e-2 * torch.randn(400, 3, generator=g, dtype=torch.float64)
    y = torch.arange(400) % 2
    _, _, m2 = class_moments(x.float(), y, 2)
    xf = x.float().double()
    for c in range(2):
        dev = xf[y == c] - xf[y == c].mean(0)
        torch.testing.assert_close(m2[c].double(), (dev * dev).sum(0), rtol=1e-4, atol=0)


@pytest.mark.parametrize("full", [False, True])
def test_fold_matches_spec_over_several_updates(full):
    num_classes, dim, momentum = 6, 5, 0.2
    stats = DenseStatistics(num_classes, dim, covariance="full" if full else "diag", momentum=momentum)
    ref = make_state(num_classes, dim, full)
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(30, dim, generator=g), torch.tensor([0, 1, 2] * 10)),        # 3..5 absent
        (torch.randn(12, dim, generator=g) + 2, torch.tensor([0] * 6 + [3] * 5 + [5])),  # 5 singleton
        (torch.randn(20, dim, generator=g) * 2, torch.randint(0, num_classes, (20,), generator=g)),
    ]
    for x, y in batches:
        stats.update(x, y)
        ref = ref_fold(ref, x, y, num_classes, momentum, full)
        torch.testing.assert_close(stats.mean.double(), ref[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stats.covariance().double(), ref[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(stats.count, ref[2]) and torch.equal(stats.class_size, ref[3])
    # the singleton of the second batch: its own sample as mean, covariance 0 (first update)
    fresh = DenseStatistics(num_classes, dim)
    x, y = batches[1]
    fresh.update(x, y)
    assert torch.equal(fresh.mean[5], x[11]) and float(fresh.covariance()[5].abs().sum()) == 0.0
    assert float(fresh.mean[4].abs().sum()) == 0.0 and int(fresh.count[4]) == 0  # absent: untouched


def test_fold_accepts_bf16_and_accumulates_in_float32():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(40, 8, generator=g) + 5).bfloat16()
    y = torch.arange(40) % 4
    stats = DenseStatistics(4, 8)
    stats.update(x, y)
    ref = ref_fold(make_state(4, 8, False), x.double(), y, 4, 0.2, False)
    assert stats.mean.dtype == torch.float32 and stats.covariance().dtype == torch.float32
    torch.testing.assert_close(stats.mean.double(), ref[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.covariance().double(), ref[1], rtol=1e-5, atol=1e-6)


def test_fold_of_moments_equals_update():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(25, 4, generator=g), torch.randint(0, 5, (25,), generator=g)
    a, b = DenseStatistics(5, 4), DenseStatistics(5, 4)
    a.update(x, y)
    b.fold(*class_moments(x, y, 5))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.covariance(), b.covariance())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_rejected_and_state_untouched(bad):
    stats = DenseStatistics(3, 2)
    x = torch.ones(4, 2)
    stats.update(x, torch.tensor([0, 0, 1, 2]))
    before = stats.state_dict()
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        stats.update(x, torch.tensor([0, 0, 1, 2]))
    assert torch.equal(stats.mean, before["mean"]) and torch.equal(stats.count, before["count"])


def test_bad_labels_and_shapes_rejected():
    stats = DenseStatistics(3, 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        stats.update(torch.zeros(2, 2), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="dimension"):
        stats.update(torch.zeros(2, 5), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer"):
        stats.update(torch.zeros(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="covariance"):
        DenseStatistics(3, 2, covariance="low")


def test_state_dict_round_trip(tmp_path):
    stats = DenseStatistics(4, 3, covariance="full")
    stats.update(torch.randn(12, 3), torch.arange(12) % 4)
    torch.save(stats.state_dict(), tmp_path / "s.pt")
    other = DenseStatistics(4, 3, covariance="full")
    other.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for name in ("mean", "count", "class_size"):
        assert torch.equal(getattr(stats, name), getattr(other, name))
    assert torch.equal(stats.covariance(), other.covariance())
    with pytest.raises(ValueError, match="checkpoint"):
        DenseStatistics(4, 3).load_state_dict(stats.state_dict())


# ---------------------------------------------------------------- §4 neighbour correction

# sizes: singletons (1), unseen (0), few-sample and large (>= tau) classes
COUNTS = [1, 5, 3, 2, 45, 1, 7, 2, 0, 12, 4, 39]


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("k", [3, 25])  # 25 > the 8 candidates available
@pytest.mark.parametrize("zero_mean,sentinel", [(False, False), (True, False), (False, True), (True, True)])
def test_correction_matches_loop(full, k, zero_mean, sentinel):
    mean, cov, n = random_stats(len(COUNTS), 4, COUNTS, full)
    got = neighbor_correction(mean, cov, n, num_neighbors=k, beta=0.1, gamma=0.2, tau=40, sigma_m=0.7,
                              sigma_cv=1.3, official_zero_mean_singletons=zero_mean,
                              official_sentinel_normalization=sentinel)
    want = ref_correct(mean, cov, COUNTS, k, beta=0.1, gamma=0.2, tau=40, sigma_m=0.7, sigma_cv=1.3,
                       zero_mean=zero_mean, sentinel=sentinel)
    assert got.shape == cov.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("full", [False, True])
def test_chunked_paths_match_loop(full):
    with memory.work_memory(0.001):  # ~1 KiB: many chunks of samples, classes and rows
        _chunked_paths_match_loop(full)
    assert memory.budget_mib() == memory.DEFAULT_MIB  # nothing left changed


def _chunked_paths_match_loop(full):
    assert memory.block_elements(parts=16) == 16
    g = torch.Generator().manual_seed(11)
    y = torch.tensor(sum(([c] * n for c, n in enumerate(COUNTS)), []))
    y = y[torch.randperm(len(y), generator=g)]
    x = torch.randn(len(y), 3, generator=g) + 1
    stats = DenseStatistics(len(COUNTS), 3, covariance="full" if full else "diag")
    ref = make_state(len(COUNTS), 3, full)
    for shift in (0.0, 0.5):
        stats.update(x + shift, y)
        ref = ref_fold(ref, x + shift, y, len(COUNTS), 0.2, full)
    torch.testing.assert_close(stats.covariance().double(), ref[1], rtol=1e-5, atol=1e-5)
    got = stats.corrected(num_neighbors=4, official_sentinel_normalization=True)
    want = ref_correct(stats.mean, stats.covariance(), COUNTS, 4, sentinel=True)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("full", [False, True])
@pytest.mark.parametrize("sentinel", [False, True])
def test_correction_on_blocks_that_do_not_divide_the_classes(full, sentinel):
    """61 classes in blocks of at most 16 (four of rows, one of the rest): the rows on both sides
    of each block, exact ties between duplicate classes in other blocks (the lower class wins),
    singletons, unseen and large classes; the float64 loop's result."""
    g = torch.Generator().manual_seed(5)
    counts = torch.randint(0, 9, (61,), generator=g)
    counts[[3, 17, 30, 44, 58]] = torch.tensor([45, 50, 41, 60, 40])
    counts[[8, 25, 51]] = torch.tensor([1, 0, 1])
    mean, cov, n = random_stats(61, 3, counts.tolist(), full, seed=5)
    for a, b in ((2, 40), (2, 59), (11, 33), (20, 21)):  # duplicate classes, equal distances
        mean[b], cov[b] = mean[a], cov[a]
    with memory.work_memory(0.001):  # 16-class blocks
        got = neighbor_correction(mean, cov, n, num_neighbors=4, official_sentinel_normalization=sentinel)
    want = ref_correct(mean, cov, counts.tolist(), 4, sentinel=sentinel)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_correction_known_values():
    # three classes on a line; class 0 has 2 samples, its only candidates are 1 and 2
    mean = torch.tensor([[0.0], [1.0], [2.0]])
    cov = torch.tensor([[1.0], [2.0], [4.0]])
    n = torch.tensor([2, 3, 5])
    out = neighbor_correction(mean, cov, n, num_neighbors=2, beta=0.1, gamma=0.1)
    # d_m(0,1) = 1, d_m(0,2) = 4 -> normalised 0, 1; d_cv 1, 3 -> 0, 1
    w1, w2 = 3.0, 5.0 * math.exp(-1.0)
    nb = (w1 * 2 + w2 * 4) / (w1 + w2)
    glob = (2 * 1 + 3 * 2 + 5 * 4) / 10
    a = 1 / (1 + math.log(1.1))
    assert float(out[0, 0]) == pytest.approx((1 - a) * 1 + a * (0.9 * nb + 0.1 * glob), rel=1e-6)


def test_correction_duplicate_classes_and_large_classes_untouched():
    mean, cov, _ = random_stats(10, 3, [2] * 10, False, seed=7)
    mean[5], cov[5] = mean[2], cov[2]  # exact tie in both distances
    mean[7], cov[7] = mean[2], cov[2]
    counts = [3, 2, 2, 4, 50, 2, 1, 2, 2, 40]
    got = neighbor_correction(mean, cov, torch.tensor(counts), num_neighbors=2)
    torch.testing.assert_close(got.double(), ref_correct(mean, cov, counts, 2), rtol=2e-5, atol=2e-6)
    assert torch.equal(got[4], cov[4]) and torch.equal(got[9], cov[9])  # n >= tau: α = 0


def test_correction_without_candidates_uses_global_or_keeps():
    mean, cov, _ = random_stats(3, 2, [1, 1, 1], False)
    only_singletons = neighbor_correction(mean, cov, torch.tensor([1, 1, 1]))
    assert float(only_singletons.abs().sum()) == 0.0  # α = 1, no class with n > 1: Σ_global = 0
    one_pool = neighbor_correction(mean, cov, torch.tensor([4, 1, 0]), gamma=0.1)
    a = 1 / (1 + math.log(1.3))
    torch.testing.assert_close(one_pool[0], (1 - a) * cov[0] + a * cov[0])  # own Σ is the global one
    torch.testing.assert_close(one_pool[1], cov[0])  # singleton: neighbour = global = class 0
    assert torch.equal(one_pool[2], cov[2])  # unseen class keeps its covariance


def test_nearest_candidates_breaks_ties_by_index():
    inf = math.inf
    dist = torch.tensor([[inf, 2.0, 1.0, 1.0, 1.0, 0.5],
                         [3.0, inf, 3.0, 3.0, inf, inf],
                         [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    values, idx = nearest_candidates(dist, 3)
    assert sorted(idx[0].tolist()) == [2, 3, 5] and values[0].tolist() == [0.5, 1.0, 1.0]
    assert sorted(idx[1].tolist()) == [0, 2, 3] and idx[2].tolist() == [0, 1, 2]
    values, idx = nearest_candidates(dist, 4)
    assert sorted(idx[1, :3].tolist()) == [0, 2, 3] and values[1, 3] == inf
    values, idx = nearest_candidates(dist, 2)
    assert idx[0].tolist() == [5, 2] and idx[1].tolist() == [0, 2]


def test_class_statistics_corrected_uses_class_sizes():
    g = torch.Generator().manual_seed(8)
    y = torch.tensor([0] * 5 + [1] * 2 + [2] + [3] * 3)
    x = torch.randn(len(y), 4, generator=g)
    stats = DenseStatistics(4, 4)
    stats.update(x, y)
    stats.update(x + 0.1, y)  # n_seen doubles, class sizes stay
    got = stats.corrected(num_neighbors=2)
    want = ref_correct(stats.mean, stats.covariance(), [5, 2, 1, 3], 2)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


# ---------------------------------------------------------------- §5 synthesis (PyTorch path) and λ


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_sampler_statistics_diag():
    cov = torch.tensor([[0.5, 2.0, 0.1], [1.0, 0.0, 3.0]])
    z = torch.tensor([[1.0, -2.0, 0.5], [0.0, 4.0, 1.0]])
    out = synthesize(z, torch.tensor([1, 0]), cov.sqrt(), math.sqrt(0.6), 40000, gen(0)).double()
    for b, c in ((0, 1), (1, 0)):
        var = 0.6 * cov[c].double()
        torch.testing.assert_close(out[:, b].mean(0), z[b].double(), rtol=0, atol=5 * float(var.max().sqrt()) / 200)
        torch.testing.assert_close(out[:, b].var(0), var, rtol=0.05, atol=1e-9)


def test_sampler_statistics_full():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.5, 0.0], [-0.3, 0.2, 0.7]])
    cov = torch.stack([a @ a.T, torch.eye(3) * 0.2])
    z = torch.tensor([[0.5, 1.0, -1.0]])
    factor, _ = cholesky_factor(cov)
    torch.testing.assert_close(factor @ factor.transpose(1, 2), cov, rtol=1e-5, atol=2e-6)
    out = synthesize(z, torch.tensor([0]), factor, math.sqrt(0.8), 40000, gen(1))[:, 0].double()
    torch.testing.assert_close(out.mean(0), z[0].double(), rtol=0, atol=0.02)
    torch.testing.assert_close(torch.cov(out.T), 0.8 * cov[0].double(), rtol=0, atol=0.03)


def test_synthesis_known_draws_and_repeatability():
    g = torch.Generator().manual_seed(2)
    cov = torch.rand(4, 5, generator=g)
    z, y = torch.randn(3, 5, generator=g), torch.tensor([3, 0, 3])
    scale = math.sqrt(0.5)
    one = synthesize(z, y, cov.sqrt(), scale, 3, gen(9))
    eps = torch.randn((3, 3, 5), generator=gen(9))  # on the CPU: the generator's own stream
    assert torch.equal(one, synthesize(z, y, cov.sqrt(), scale, 3, gen(9)))
    torch.testing.assert_close(one, z + scale * cov[y].sqrt() * eps)
    quirk = synthesize(z, y, cov.sqrt(), scale, 3, gen(9), repeated_sqrt=True)
    for m in range(3):  # sample m + 1 uses Σ^(1/2^(m+1))
        torch.testing.assert_close(quirk[m], z + scale * cov[y] ** (0.5 ** (m + 1)) * eps[m])
    full, _ = cholesky_factor(torch.diag_embed(cov))
    torch.testing.assert_close(synthesize(z, y, full, scale, 3, gen(9)), one, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="diagonal"):
        synthesize(z, y, full, scale, 3, repeated_sqrt=True)


def test_gradient_flows_to_embeddings_only():
    std = torch.rand(3, 4, requires_grad=True)
    z = torch.randn(5, 4, requires_grad=True)
    out = synthesize(z, torch.tensor([0, 1, 2, 0, 1]), std, 0.7, 3)
    out.sum().backward()
    assert torch.equal(z.grad, torch.full_like(z, 3.0)) and std.grad is None


def test_cholesky_jitter_only_where_needed():
    good = torch.tensor([[2.0, 0.5], [0.5, 1.0]])
    bad = torch.tensor([[1.0, 0.0], [0.0, -1e-4]])  # indefinite: needs δ > 1e-4
    factor, jitter = cholesky_factor(torch.stack([good, bad, torch.zeros(2, 2)]), jitter=1e-6)
    assert jitter == pytest.approx(1e-3)
    torch.testing.assert_close(factor[0], torch.linalg.cholesky(good + 1e-6 * torch.eye(2)))
    torch.testing.assert_close(factor[1], torch.linalg.cholesky(bad + 1e-3 * torch.eye(2)))
    torch.testing.assert_close(factor[2], torch.eye(2) * 1e-3)
    with pytest.raises(ValueError, match="positive definite"):
        cholesky_factor(torch.tensor([[[-5.0]]]), max_tries=3)


def test_synthesize_rejects_bad_input():
    std = torch.ones(2, 3)
    with pytest.raises(ValueError, match="NaN or Inf"):
        synthesize(torch.tensor([[float("nan"), 0.0, 0.0]]), torch.tensor([0]), std, 0.5, 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        synthesize(torch.zeros(1, 3), torch.tensor([2]), std, 0.5, 2)
    with pytest.raises(ValueError, match="num"):
        synthesize(torch.zeros(1, 3), torch.tensor([1]), std, 0.5, 0)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0))  # stands in for a CUDA generator
    with pytest.raises(ValueError, match="CPU torch.Generator"):
        synthesize(torch.zeros(1, 3), torch.tensor([1]), std, 0.5, 2, generator=on_gpu)


def test_draw_seed_is_one_host_draw():
    g = torch.Generator().manual_seed(21)
    seeds = [draw_seed(g) for _ in range(3)]
    replay = torch.Generator().manual_seed(21)
    assert seeds == [int(torch.randint(0, 2**63 - 1, (), generator=replay)) for _ in range(3)]
    assert len(set(seeds)) == 3 and all(0 <= s < 2**63 for s in seeds)


def test_lambda_schedule():
    got = {e: lambda_schedule(0.8, e, 100) for e in (1, 40, 41, 60, 61, 80, 81, 100)}
    assert got == {1: 0.8, 40: 0.8, 41: 0.8 * 0.9, 60: 0.8 * 0.9, 61: 0.8 * 0.75, 80: 0.8 * 0.75,
                   81: 0.8 * 0.6, 100: 0.8 * 0.6}
    assert [lambda_schedule(1.0, e, 10) for e in range(1, 11)] == [1.0] * 4 + [0.9] * 2 + [0.75] * 2 + [0.6] * 2
    assert lambda_schedule(0.5, 2, 5) == 0.5 and lambda_schedule(0.5, 3, 5) == 0.45  # 0.4T, 0.6T exactly
    with pytest.raises(ValueError):
        lambda_schedule(0.5, 1, 0)


# ---------------------------------------------------------------- the IAA object


def refresh_data(num_classes=12, dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(num_classes).repeat_interleave(torch.tensor([1, 5, 3, 2, 8, 1, 7, 2, 4, 12, 4, 6])[:num_classes])
    return torch.randn(num_classes, dim, generator=g)[y] + 0.4 * torch.randn(len(y), dim, generator=g), y


def test_iaa_schedule_follows_the_official_loop():
    iaa = IAA(10, 4, epochs=100, start_epoch=30, update_every_M_epoch=2, warmup_epoch=1, intra_lamda=0.6)
    assert [e for e in range(1, 40) if iaa.refresh_due(e)] == [31, 33, 35, 37, 39]
    assert not iaa.active(33)  # no statistics yet
    iaa.fold(torch.randn(20, 4), torch.arange(20) % 10)
    assert [iaa.active(e) for e in (31, 32, 33)] == [False, True, True]  # from start + warmup + 1
    assert iaa.lam(40) == 0.6 and iaa.lam(41) == pytest.approx(0.54) and iaa.lam(100) == pytest.approx(0.36)
    assert iaa.synthesize(torch.zeros(2, 4), torch.tensor([0, 1]), 31) is None
    off = IAA(10, 4, epochs=100, intra=False)
    assert not any(off.refresh_due(e) for e in range(1, 101))


@pytest.mark.parametrize("covariance, limit, form", [("diag", 2.0, "diag"), ("full", 0.0, "full"),
                                                     ("lowrank", 2.0, "lowrank"), ("auto", 2.0, "full"),
                                                     ("auto", 1e-9, "lowrank")])
def test_iaa_resolves_one_covariance_form(covariance, limit, form):
    iaa = IAA(12, 6, epochs=10, covariance=covariance, dense_full_limit_gib=limit, correction="on", num_neighbor=3)
    assert iaa.form == form
    assert isinstance(iaa.statistics, LowRankStatistics if form == "lowrank" else DenseStatistics)
    x, y = refresh_data()
    iaa.fold(x, y)
    factor = iaa.factor
    if form == "diag":
        want = neighbor_correction(iaa.statistics.mean, iaa.statistics.covariance(), iaa.statistics.class_size,
                                   num_neighbors=3).sqrt()
        torch.testing.assert_close(factor, want)
    else:  # full and low-rank: the same corrected full covariance (Eq. 16), two representations
        dense = DenseStatistics(12, 6, "full")
        dense.update(x, y)
        want = dense.corrected(num_neighbors=3)
        got = factor.covariance() if form == "lowrank" else factor @ factor.transpose(1, 2)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_iaa_correction_switches():
    assert IAA(1001, 2, epochs=1).correction is not None  # auto: on above 1000 classes (official code)
    assert IAA(1000, 2, epochs=1).correction is None
    assert IAA(10, 2, epochs=1, correction="on", official_uncorrected_sampling=True).correction is None
    with pytest.raises(ValueError, match="low-rank"):
        IAA(10, 2, epochs=1, covariance="lowrank", official_sentinel_normalization=True)
    with pytest.raises(ValueError, match="diag"):
        IAA(10, 2, epochs=1, covariance="full", official_repeated_sqrt=True)
    with pytest.raises(ValueError, match="covariance"):
        IAA(10, 2, epochs=1, covariance="dense")
    with pytest.raises(ValueError, match="intra_lamda"):
        IAA(10, 2, epochs=1, intra_lamda=float("nan"))


def test_iaa_synthesize_is_the_kernel_with_its_generator():
    x, y = refresh_data()
    iaa = IAA(12, 6, epochs=10, start_epoch=0, intra_lamda=0.7, aug_num=4, seed=5)
    iaa.fold(x, y)
    z = torch.randn(8, 6, requires_grad=True)
    labels = y[:8]
    out = iaa.synthesize(z, labels, epoch=6)
    want = synthesize(z, labels, iaa.statistics.covariance().sqrt(), math.sqrt(0.7 * 0.9), 4, gen(5))
    assert out.shape == (4, 8, 6) and torch.equal(out, want)
    out.sum().backward()
    assert torch.equal(z.grad, torch.full_like(z, 4.0))


@pytest.mark.parametrize("covariance", ["diag", "full", "lowrank"])
def test_iaa_state_dict_round_trip(tmp_path, covariance):
    x, y = refresh_data()
    iaa = IAA(12, 6, epochs=10, start_epoch=0, covariance=covariance, correction="on", num_neighbor=3, seed=1)
    iaa.fold(x, y)
    iaa.synthesize(torch.zeros(3, 6), y[:3], 1)  # advance the generator
    torch.save(iaa.state_dict(), tmp_path / "iaa.pt")
    other = IAA(12, 6, epochs=10, start_epoch=0, covariance=covariance, correction="on", num_neighbor=3, seed=2)
    other.load_state_dict(torch.load(tmp_path / "iaa.pt", weights_only=False))
    z = torch.randn(3, 6)
    assert torch.equal(iaa.synthesize(z, y[:3], 2), other.synthesize(z, y[:3], 2))  # same statistics, same noise
    with pytest.raises(ValueError, match="statistics"):
        IAA(12, 6, epochs=10, covariance="diag" if covariance != "diag" else "full").load_state_dict(iaa.state_dict())
