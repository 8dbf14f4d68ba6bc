"""fastiaa.evaluation against a float64 transcription of docs/method.md §8 and pytorch-metric-learning."""

import sys

import numpy as np
import pytest
import torch

from fastiaa import memory
from fastiaa.blocks import even_side
from fastiaa.evaluation import metrics, retrieval_metrics

BACKENDS = ("torch", "faiss")
KS = (1, 2, 4, 8, 40, 100)  # 40 and 100 lie beyond the torch backend's short list


def brute_force(query, query_labels, reference, reference_labels, ks, map_at_r=True):
    """Spec §8 transcribed per query in float64. ``reference=None``: single-set mode, the query's
    own row excluded. Ranking: similarity down, equal similarities by reference index up."""
    single = reference is None
    q = np.asarray(query, np.float64)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    r = q if single else np.asarray(reference, np.float64) / np.linalg.norm(reference, axis=1, keepdims=True)
    ref_labels = np.asarray(query_labels if single else reference_labels)
    hits = dict.fromkeys(ks, 0)
    ap, rp, with_positive = [], [], 0
    for i in range(len(q)):
        candidates = np.array([j for j in range(len(r)) if not (single and j == i)])
        sim = r[candidates] @ q[i]
        ranked = candidates[np.lexsort((candidates, -sim))]
        positive = ref_labels[ranked] == query_labels[i]
        for k in ks:
            hits[k] += bool(positive[:k].any())
        big_r = int(positive.sum())
        if big_r == 0:
            continue
        with_positive += 1
        precision_at = np.cumsum(positive[:big_r]) / np.arange(1, big_r + 1)
        ap.append(float((precision_at * positive[:big_r]).sum() / big_r))
        rp.append(float(positive[:big_r].sum() / big_r))
    out = {f"recall@{k}": hits[k] / len(q) for k in ks}
    if map_at_r:
        out["map@r"] = float(np.mean(ap)) if ap else float("nan")
        out["r_precision"] = float(np.mean(rp)) if rp else float("nan")
    out["num_queries"] = len(q)
    return out


def assert_same(got, want, tol=1e-12):
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol, nan_ok=True), key


def gaussian_clusters(rng, labels, dim, spread, gap=2e-6):
    """Class centre + noise per row, rows redrawn until no query row holds two different
    float64 cosine similarities closer than ``gap``: float32 rounding (~1e-7) cannot reorder
    them, so the float32 implementation and the float64 transcription rank alike."""
    centres = rng.standard_normal((labels.max() + 1, dim))
    x = centres[labels] + spread * rng.standard_normal((len(labels), dim))
    while True:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        sim = unit @ unit.T
        order = np.argsort(sim, axis=1)
        close = np.diff(np.take_along_axis(sim, order, axis=1), axis=1) < gap
        if not close.any():
            return x.astype(np.float32)
        redraw = np.unique(order[:, 1:][close])
        x[redraw] = centres[labels[redraw]] + spread * rng.standard_normal((len(redraw), dim))


def plant_duplicates(x, labels, same, other):
    """Copy rows onto ``same`` later rows of their class and ``other`` rows of other classes."""
    pairs = np.argwhere(np.triu(labels[:, None] == labels[None, :], 1))[:same].tolist()
    pairs += np.argwhere(np.triu(labels[:, None] != labels[None, :], 1))[::997][:other].tolist()
    for i, j in pairs:
        x[j] = x[i]
    return x


def generic_set(seed=0, n=300, dim=12):
    """Gaussian clusters with string labels, class sizes 1-9 (singletons included), and
    planted exact duplicates inside a class and across classes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(n), rng.integers(1, 10, size=n))[:n])
    x = plant_duplicates(gaussian_clusters(rng, labels, dim, 0.9), labels, same=12, other=12)
    return x, np.array([f"item_{c:03d}" for c in labels])


def lattice_set(seed=1, n=240, num_classes=30):
    """Vectors with four entries of +-1 in 8 dimensions: normalised entries are +-0.5, every
    cosine similarity is an exact multiple of 1/4 in float32 and float64, so ties abound."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 8), np.float32)
    for i in range(n):
        x[i, rng.choice(8, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    labels = rng.integers(0, num_classes, n)
    labels[-1] = num_classes  # a singleton class
    return x, labels


@pytest.fixture(scope="module")
def generic():
    return generic_set()


@pytest.fixture(scope="module")
def lattice():
    return lattice_set()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data", ["generic", "lattice"])
def test_single_set_matches_brute_force(backend, data, request):
    x, y = request.getfixturevalue(data)
    with pytest.warns(UserWarning, match="no positive"):  # singletons (R = 0) in both sets
        got = retrieval_metrics(x, y, ks=KS, backend=backend)
    assert_same(got, brute_force(x, y, None, None, KS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data", ["generic", "lattice"])
def test_query_gallery_matches_brute_force(backend, data, request):
    x, y = request.getfixturevalue(data)
    q, ql, g, gl = x[140:], y[140:], x[:140], y[:140]
    with pytest.warns(UserWarning, match="no positive"):  # singletons among the queries
        got = retrieval_metrics(q, ql, g, gl, ks=KS, backend=backend)
    assert_same(got, brute_force(q, ql, g, gl, KS))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("data", ["generic", "lattice"])
def test_tiny_chunks_and_short_lists(backend, data, request, monkeypatch):
    """Many chunks (some without ties, some full of them), lists shorter than R: still exact."""
    x, y = request.getfixturevalue(data)
    monkeypatch.setattr(metrics, "_SHORT_LIST", 2)
    with pytest.warns(UserWarning), memory.work_memory(3 * len(x) * 4 / 2**20):  # blocks of 3 query rows
        got = retrieval_metrics(x, y, ks=(1, 3, 50), backend=backend)
    assert_same(got, brute_force(x, y, None, None, (1, 3, 50)))


def test_self_excluded_by_index_not_by_rank():
    """Row 0 and row 1 are identical but of different classes; row 2 shares row 1's class.
    Query 1's nearest other row is row 0 (a miss at rank 0), its positive row 2 comes second.
    Dropping "the first neighbour" instead would drop row 0 and keep the query itself."""
    x = np.array([[1.0, 0.0], [1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    y = np.array([0, 1, 1, 2])
    for backend in BACKENDS:
        with pytest.warns(UserWarning, match="2 of 4"):
            got = retrieval_metrics(x, y, ks=(1, 2), backend=backend)
        # query 1: ranked 0, 2, 3 -> R@1 miss, R@2 hit, R = 1: AP = 0, RP = 0
        # query 2: ranked 0 (sim .8), 1 (sim .8, tie, higher index), 3 (.6) -> R@1 miss, R@2 hit, R = 1: AP = RP = 0
        # queries 0 and 3 have no positive: misses, left out of MAP@R / RP
        assert_same(got, {"recall@1": 0.0, "recall@2": 0.5, "map@r": 0.0, "r_precision": 0.0, "num_queries": 4})


def test_known_answer_query_gallery():
    """Hand-computed: MAP@R with R = 2 and ties resolved by gallery index."""
    g = np.array([[1, 0], [0.6, 0.8], [0.6, 0.8], [0, 1], [-1, 0]], np.float32)
    gl = np.array(["a", "b", "a", "b", "c"])
    q = np.array([[0.6, 0.8], [1, 0]], np.float32)
    ql = np.array(["a", "z"])  # "z" has no positive in the gallery
    # query 0: sims 0.6, 1, 1, 0.8, -0.6 -> order 1(b), 2(a), 3(b), 0(a), 4 -> first hit at rank 1;
    # R = 2: top-2 = b, a -> RP = 1/2, AP = (1/2 * [a at 2]) / 2 = 1/4.
    with pytest.warns(UserWarning, match="1 of 2"):
        got = retrieval_metrics(q, ql, g, gl, ks=(1, 2), backend="torch")
    assert_same(got, {"recall@1": 0.0, "recall@2": 0.5, "map@r": 0.25, "r_precision": 0.5, "num_queries": 2})


@pytest.mark.filterwarnings("ignore:1 of 240 queries have no positive")
def test_input_kinds_give_the_same_answer(lattice):
    x, y = lattice
    want = retrieval_metrics(x, y, ks=(1, 4), backend="torch", device="cpu")
    assert_same(retrieval_metrics(torch.from_numpy(4 * x).double(), torch.from_numpy(y), ks=[1, 4]), want)
    assert_same(retrieval_metrics(torch.from_numpy(x).half(), list(y), ks=(1, 4)), want)
    assert_same(retrieval_metrics(torch.from_numpy(x).bfloat16(), y.astype(str), ks=(1, 4)), want)
    no_map = retrieval_metrics(x, y, ks=(1, 4), map_at_r=False)
    assert set(no_map) == {"recall@1", "recall@4", "num_queries"}
    assert no_map["recall@4"] == want["recall@4"]


def test_full_float32_products_even_with_tf32_allowed(generic):
    """The caller's reduced matmul precision (TF32 / bf16) is lifted for the call and restored."""
    x, y = generic
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with pytest.warns(UserWarning):
            got = retrieval_metrics(x, y, ks=KS, backend="torch")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert_same(got, brute_force(x, y, None, None, KS))


@pytest.mark.filterwarnings("ignore:1 of 240 queries have no positive")
def test_largest_possible_k(lattice):
    x, y = lattice
    n = len(x)
    got = retrieval_metrics(x, y, ks=(n - 1,), map_at_r=False)
    assert got[f"recall@{n - 1}"] == pytest.approx(np.mean(np.bincount(y)[y] > 1))
    with pytest.raises(ValueError, match=f"Recall@{n} needs at least {n}"):
        retrieval_metrics(x, y, ks=(n,))
    with pytest.raises(ValueError, match="Recall@141 needs at least 141 references"):
        retrieval_metrics(x[:100], y[:100], x[100:], y[100:], ks=(141,))


def test_bad_input_is_named():
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    y = np.arange(20) % 5
    cases = [
        (dict(query=x, query_labels=y, ks=(0,)), ValueError, "positive integers"),
        (dict(query=x, query_labels=y, ks=(True,)), ValueError, "positive integers"),
        (dict(query=x, query_labels=y[:-1]), ValueError, "one label per embedding row"),
        (dict(query=x[None], query_labels=y), ValueError, r"\[N, D\]"),
        (dict(query=np.full_like(x, np.nan), query_labels=y), ValueError, "NaN"),
        (dict(query=x.astype(np.int64), query_labels=y), TypeError, "floating-point"),
        (dict(query=x.tolist(), query_labels=y), TypeError, "torch tensor or numpy array"),
        (dict(query=x, query_labels=y, reference=x), ValueError, "reference_labels"),
        (dict(query=x, query_labels=y, reference_labels=y), ValueError, "without reference"),
        (dict(query=x, query_labels=y, reference=x[:, :3], reference_labels=y), ValueError, "dimension"),
        (dict(query=x, query_labels=y, reference=x, reference_labels=y.astype(str)), TypeError, "comparable"),
        (dict(query=x, query_labels=y, backend="annoy"), ValueError, "backend"),
        (dict(query=x, query_labels=y, device="meta"), ValueError, "CPU or CUDA"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            retrieval_metrics(**kwargs)


def test_faiss_gpu_k_limit_falls_back_to_torch_under_auto(monkeypatch):
    x = np.random.default_rng(0).standard_normal((2100, 4)).astype(np.float32)
    y = np.arange(2100) % 700
    want = retrieval_metrics(x, y, ks=(1, 2047), backend="torch")
    monkeypatch.setattr(metrics, "_choose_backend", lambda *args, **kwargs: (True, True))  # as if faiss saw a GPU
    with pytest.warns(UserWarning, match="at most 2048 neighbours but 2049 are needed.*torch backend instead"):
        assert retrieval_metrics(x, y, ks=(1, 2047)) == want
    with pytest.raises(ValueError, match="at most 2048 neighbours but 2049 are needed"):
        retrieval_metrics(x, y, ks=(1, 2047), backend="faiss")


def test_faiss_gpu_index_lives_on_the_requested_device_with_shared_bounded_resources(monkeypatch):
    """The GPU branch with a stand-in for faiss's GPU functions: index on the asked device only,
    one StandardGpuResources per device and process, temporary memory from the budget."""
    import types

    import faiss

    made, placed = [], []

    class Resources:
        def __init__(self):
            made.append(self)

        def setTempMemory(self, nbytes):
            self.temp = nbytes

    def to_gpu(resources, device, index):
        placed.append((resources, device))
        return index  # keep searching on the CPU index

    fake = types.SimpleNamespace(IndexFlatIP=faiss.IndexFlatIP, StandardGpuResources=Resources, index_cpu_to_gpu=to_gpu)
    monkeypatch.setitem(sys.modules, "faiss", fake)
    monkeypatch.setattr(metrics, "_GPU_RESOURCES", {})
    x, y = torch.randn(50, 8), torch.arange(50) % 10
    ref, positives = torch.nn.functional.normalize(x, dim=1), metrics._Positives(y.numpy(), y.numpy(), True, "cpu")
    with memory.work_memory(64):
        for _ in range(2):
            metrics._FaissRanker(ref, positives, True, 4, True, 5, torch.device("cuda", 1))
    assert len(made) == 1 and made[0].temp == 64 * 2**20 and placed == [(made[0], 1), (made[0], 1)]


def test_no_positive_anywhere_gives_nan():
    x = np.eye(3, dtype=np.float32)
    with pytest.warns(UserWarning, match="3 of 3"):
        got = retrieval_metrics(x, [0, 1, 2], ks=(1,))
    assert got["recall@1"] == 0.0 and np.isnan(got["map@r"]) and np.isnan(got["r_precision"])


# pytorch-metric-learning ----------------------------------------------------------------


def pml_metrics(query, query_labels, reference=None, reference_labels=None):
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )
    norm = lambda a: torch.nn.functional.normalize(torch.as_tensor(a, dtype=torch.float32), dim=1)  # noqa: E731
    return calculator.get_accuracy(
        norm(query),
        torch.as_tensor(query_labels),
        None if reference is None else norm(reference),
        None if reference_labels is None else torch.as_tensor(reference_labels),
    )


@pytest.fixture(scope="module")
def clustered():
    """Gaussian clusters, class sizes 2-8, duplicates only inside a class, no near-ties."""
    rng = np.random.default_rng(3)
    labels = rng.permutation(np.repeat(np.arange(60), rng.integers(2, 9, 60)))
    return plant_duplicates(gaussian_clusters(rng, labels, 16, 0.8), labels, same=10, other=0), labels


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pytorch_metric_learning_single_set(backend, clustered):
    x, y = clustered
    ours = retrieval_metrics(x, y, ks=(1,), backend=backend)
    theirs = pml_metrics(x, y)
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_pytorch_metric_learning_query_gallery(backend, clustered):
    """With queries that have no positive in the gallery: pytorch-metric-learning leaves them
    out of every metric; fastiaa leaves them out of MAP@R and RP but counts them as Recall@K
    misses, so R@1 = P@1 x (queries with a positive) / (all queries)."""
    x, y = clustered
    odd = np.arange(len(y)) % 2 == 1
    gallery = odd & ~np.isin(y, [0, 1, 2])  # classes 0-2 have no gallery images
    q, ql, g, gl = x[~odd], y[~odd], x[gallery], y[gallery]
    with pytest.warns(UserWarning, match="no positive"):
        ours = retrieval_metrics(q, ql, g, gl, ks=(1,), backend=backend)
    theirs = pml_metrics(q, ql, g, gl)
    with_positive = np.isin(ql, gl).mean()
    assert 0 < with_positive < 1
    assert ours["recall@1"] == pytest.approx(theirs["precision_at_1"] * with_positive, abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_metrics_equal_the_cpu_ones(backend, clustered):
    x, y = clustered
    if backend == "faiss":
        faiss = pytest.importorskip("faiss")
        if faiss.get_num_gpus() == 0:
            pytest.skip("this faiss build sees no GPU (faiss-cpu)")
    on_gpu = retrieval_metrics(torch.as_tensor(x).cuda(), y, ks=(1, 2, 4), backend=backend)
    on_cpu = retrieval_metrics(x, y, ks=(1, 2, 4), backend="torch")
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, abs=1e-12), key


# symmetric blocks and the choice of backend ---------------------------------------------


def symmetric_blocks(monkeypatch) -> list:
    """Record the class-aligned blocks of every single-set torch pass."""
    made = []
    init = metrics._SymmetricRanker.__init__

    def spy(self, *args):
        init(self, *args)
        made.append(self.bounds)

    monkeypatch.setattr(metrics._SymmetricRanker, "__init__", spy)
    return made


@pytest.mark.parametrize("data", ["generic", "lattice"])
@pytest.mark.parametrize("rows", [16, 48, 112])
def test_symmetric_blocks_that_do_not_divide_n(data, rows, request, monkeypatch):
    """The single-set torch pass on blocks of at most 16-112 rows (N = 300 and 240: many blocks,
    none dividing N, a class never split): ties, duplicates across classes and blocks,
    singletons and string labels give the float64 transcription's numbers."""
    x, y = request.getfixturevalue(data)
    made = symmetric_blocks(monkeypatch)
    with pytest.warns(UserWarning, match="no positive"), memory.work_memory(rows * rows * 16 * 4 / 2**20):
        assert metrics._SymmetricRanker.side() == rows
        got = retrieval_metrics(x, y, ks=KS, backend="torch")
        no_map = retrieval_metrics(x, y, ks=(1, 3, 50), map_at_r=False)
    assert_same(got, brute_force(x, y, None, None, KS))
    assert_same(no_map, brute_force(x, y, None, None, (1, 3, 50), map_at_r=False))
    bounds, codes = np.array(made[0]), np.unique(y, return_inverse=True)[1]
    largest = np.bincount(codes).max()
    assert len(bounds) > 3 and np.diff(bounds).max() <= even_side(len(x), rows, slack=largest - 1) < len(x)
    order = np.argsort(codes, kind="stable")
    assert all(codes[order][b - 1] != codes[order][b] for b in bounds[1:-1])  # whole classes


def test_class_larger_than_a_block_takes_the_query_chunks(lattice, monkeypatch):
    x, y = lattice
    y = y.copy()
    y[:40] = 0  # a class of 40 or more: larger than 16-row blocks
    made = symmetric_blocks(monkeypatch)
    with pytest.warns(UserWarning, match="no positive"), memory.work_memory(16 * 16 * 16 * 4 / 2**20):
        got = retrieval_metrics(x, y, ks=KS, backend="torch")
    assert made == []
    assert_same(got, brute_force(x, y, None, None, KS))


@pytest.mark.parametrize("vendor,gallery_faiss", [("AMD", True), ("Intel", False), (None, False)])
def test_auto_backend_on_a_cpu_follows_the_measured_rule_and_says_so_once(vendor, gallery_faiss, monkeypatch, caplog):
    monkeypatch.setattr(metrics, "_cpu_vendor", lambda: vendor)
    metrics._report_auto.cache_clear()
    cpu = torch.device("cpu")
    with caplog.at_level("INFO", logger="fastiaa.evaluation.metrics"):
        for _ in range(2):
            assert metrics._choose_backend("auto", cpu, True, False) == (False, False)  # symmetric pass
            assert metrics._choose_backend("auto", cpu, False, False) == (gallery_faiss, False)
    assert metrics._choose_backend("torch", cpu, False, False) == (False, False)
    assert metrics._choose_backend("faiss", cpu, True, False) == (True, False)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(f"on this {vendor or 'unknown'} CPU" in line for line in lines)
    assert "symmetric" in lines[0] and ("faiss" if gallery_faiss else "torch") in lines[1]
    metrics._report_auto.cache_clear()
