"""fastiaa.index, `fastiaa index` and `fastiaa search`: exact and approximate faiss indexes against the
evaluator's definitions, self-exclusion, the one-file format, the search outputs and refusals."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from fastiaa import checkpoint, cli
from fastiaa.data import load_dataset
from fastiaa.embeddings import Embeddings
from fastiaa.evaluation import retrieval_metrics
from fastiaa.models import create_model
from fastiaa.train import evaluate_checkpoint

pytest.importorskip("faiss")  # the GPU check's environment may lack it
from fastiaa.index import IndexSettings, RetrievalIndex, results_table  # noqa: E402

def clustered(n=600, classes=60, dim=24, seed=0, prefix="/img") -> Embeddings:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    x = np.random.default_rng(99).standard_normal((classes, dim))[labels] + 0.8 * rng.standard_normal((n, dim))
    return Embeddings(x.astype(np.float32), tuple(f"{prefix}/{i}.jpg" for i in range(n)),
                      tuple(f"c{k}" for k in labels), {"embedding_size": dim})


@pytest.mark.parametrize("settings", [IndexSettings(), IndexSettings("hnsw", ef_search=600),
                                      IndexSettings("ivf", nprobe=1000)])
def test_recall_from_the_index_is_the_evaluators(settings):
    """Leave-one-out over the indexed embeddings, and other queries against them: the definitions of
    docs/method.md §8 as retrieval_metrics computes them (the approximate kinds searched exhaustively)."""
    data = clustered()
    index = RetrievalIndex.build(data, settings)
    assert index.recall(data, (1, 2, 4, 8)) == retrieval_metrics(data.vectors, data.labels, ks=(1, 2, 4, 8),
                                                                 map_at_r=False)
    queries = clustered(n=150, seed=1, prefix="/query")
    assert index.recall(queries, (1, 5)) == retrieval_metrics(queries.vectors, queries.labels, data.vectors,
                                                              data.labels, ks=(1, 5), map_at_r=False)


def test_non_finite_embeddings_are_refused_by_name():
    data = clustered()
    data.vectors[7, 3] = np.nan
    with pytest.raises(ValueError, match=r"1 embedding\(s\) hold NaN or Inf \(the first of /img/7\.jpg\)"):
        RetrievalIndex.build(data)


def test_search_known_answer_and_self_exclusion():
    angles = np.radians([0.0, 30.0, 90.0, 180.0])
    x = np.stack([np.cos(angles), np.sin(angles)], 1) * [[1.0], [3.0], [0.5], [2.0]]  # lengths do not matter
    index = RetrievalIndex.build(Embeddings(x, ("a", "b", "c", "d"), ("x", "x", "y", "y"), {}))
    similarities, ids = index.search(x[:2], 3)
    np.testing.assert_array_equal(ids, [[0, 1, 2], [1, 0, 2]])
    np.testing.assert_allclose(similarities, [[1, np.cos(np.radians(30)), 0], [1, np.cos(np.radians(30)),
                                                                                np.cos(np.radians(60))]], atol=1e-6)
    similarities, ids = index.search(x[:2], 3, exclude=np.array([0, -1]))
    np.testing.assert_array_equal(ids, [[1, 2, 3], [1, 0, 2]])
    (retrieval,) = index.retrievals(x[:1], ["q"], ["x"], 1, exclude=np.array([0]))
    (hit,) = retrieval.hits
    assert (retrieval.path, hit.path, hit.label) == ("q", "b", "x")
    assert hit.similarity == pytest.approx(np.cos(np.radians(30)))


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_saved_index_answers_like_the_built_one(tmp_path, kind):
    data = clustered()
    built = RetrievalIndex.build(data, IndexSettings(kind, ef_search=40, nprobe=3))
    built.save(tmp_path / "a.index")
    loaded = RetrievalIndex.load(tmp_path / "a.index")
    assert (loaded.paths, loaded.labels, loaded.model, loaded.settings) == (data.paths, data.labels, data.model,
                                                                            built.settings)
    for a, b in zip(built.search(data.vectors, 10), loaded.search(data.vectors, 10)):
        np.testing.assert_array_equal(a, b)
    (tmp_path / "b.index").write_text("not an index")
    with pytest.raises(ValueError, match="not an index written by `fastiaa index build`"):
        RetrievalIndex.load(tmp_path / "b.index")


def test_results_table_formats():
    index = RetrievalIndex.build(clustered(n=20, classes=2))
    retrievals = index.retrievals(index.index.reconstruct_n(0, 2), ["/q0.jpg", "/q1.jpg"], ["c0", ""], 2)
    rows = results_table(retrievals, "csv").splitlines()
    assert rows[0] == "query,query_label,rank,path,label,similarity" and len(rows) == 5
    assert rows[1] == "/q0.jpg,c0,1,/img/0.jpg,c0,1.000000"
    listed = json.loads(results_table(retrievals, "json"))
    assert listed[1]["query"] == "/q1.jpg" and [n["rank"] for n in listed[1]["neighbours"]] == [1, 2]
    assert listed[1]["neighbours"][0] == {"rank": 1, "path": "/img/1.jpg", "label": "c1", "similarity": 1.0}


def test_index_and_search_commands_on_a_trained_model(own_run, tmp_path, capsys):
    """Embed the held-out classes, index them, Recall@1 from the index = `fastiaa eval`'s; search
    a query image; a model of another dimension or other weights is refused."""
    ckpt, test = str(own_run["checkpoint"]), load_dataset("folder", own_run["folder"]).test
    (tmp_path / "test.csv").write_text("path,label\n" + "".join(
        f"{p},{test.class_ids[k]}\n" for p, k in zip(test.paths, test.labels)))
    emb, index = str(tmp_path / "test.npy"), str(tmp_path / "test.index")
    assert cli.main(["embed", "--checkpoint", ckpt, "--images", str(tmp_path / "test.csv"), "--out", emb,
                     "--device", "cpu"]) == 0
    assert cli.main(["index", "build", "--embeddings", emb, "--out", index]) == 0
    capsys.readouterr()
    assert cli.main(["index", "eval", "--index", index, "--queries", emb, "--recall", "1", "4"]) == 0
    from_index = json.loads(capsys.readouterr().out)
    evaluated = evaluate_checkpoint(ckpt, device="cpu")
    assert from_index["recall@1"] == evaluated["recall@1"] and from_index["recall@4"] == evaluated["recall@4"]

    query = test.paths[3]
    assert cli.main(["search", "--index", index, "--checkpoint", ckpt, "--query", query, "--k", "4", "--device",
                     "cpu", "--out", str(tmp_path / "hits.json"), "--plot", str(tmp_path / "hits.png")]) == 0
    (found,) = json.loads((tmp_path / "hits.json").read_text())
    assert found["query"] == query and found["neighbours"][0]["path"] == query  # itself, at similarity 1
    assert found["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-5) and len(found["neighbours"]) == 4
    assert (tmp_path / "hits.png").stat().st_size > 0

    other = own_run["config"]
    for size, message in ((64, "holds 512-d embeddings but checkpoint .* gives 64-d ones"),
                          (512, "holds the embeddings of another model than checkpoint .* .weights")):
        torch.manual_seed(size)
        weights = create_model("efficientnet_lite0", size, False).state_dict()
        checkpoint.save(tmp_path / f"other{size}.pt", {"config": other.replace(embedding_size=size).to_dict(),
                                                      "model": weights})
        assert cli.main(["search", "--index", index, "--checkpoint", str(tmp_path / f"other{size}.pt"),
                         "--query", query, "--device", "cpu"]) == 2
        err = capsys.readouterr().err.split("\r")[-1]  # after the progress bars
        assert err.startswith(f"fastiaa search: error: index {index}") and len(err.splitlines()) == 1
        assert re.search(message, err), err
