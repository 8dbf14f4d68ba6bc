"""fastiaa.embeddings and `fastiaa embed`: the trainer's evaluation embeddings written as .npy + sidecar,
the image inputs, unreadable images, and the model fingerprint."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fastiaa import checkpoint, cli, runtime
from fastiaa.data import MalformedDatasetError, load_dataset
from fastiaa.distributed import World
from fastiaa.embeddings import Embeddings, fingerprint, image_inputs, require_same_model
from fastiaa.evaluation import embed


@pytest.fixture(scope="module")
def held_out(own_run):
    """(test split of the run's drawn class split, the trainer's evaluation embeddings of it)."""
    state = checkpoint.load(own_run["checkpoint"])
    cfg = checkpoint.config_of(state).replace(device="cpu")
    cpu = torch.device("cpu")
    model = runtime.checkpoint_model(state, cfg, cpu)
    dataset = load_dataset(cfg.data.dataset, cfg.data.data)
    loader = runtime.eval_loaders(cfg, dataset, model.input_space, cpu, World())["test"]
    z, _ = embed(model, loader, cpu, runtime.autocast_dtype(cfg.runtime.amp, cpu))
    return dataset.test, z.numpy()


def _list_csv(path, images) -> str:
    rows = (f"{p},{images.class_ids[k]}\n" for p, k in zip(images.paths, images.labels))
    path.write_text("path,label\n" + "".join(rows))
    return str(path)


def test_embed_writes_the_trainers_evaluation_embeddings(own_run, held_out, tmp_path, capsys):
    test, expected = held_out
    images = _list_csv(tmp_path / "test.csv", test)
    for dtype in ("float32", "float16"):
        out = tmp_path / f"test_{dtype}.npy"
        assert cli.main(["embed", "--checkpoint", str(own_run["checkpoint"]), "--images", images, "--out", str(out),
                         "--dtype", dtype, "--device", "cpu"]) == 0
        saved = np.load(out)
        assert saved.dtype == np.dtype(dtype) and saved.shape == (len(test), 512)
        np.testing.assert_array_equal(saved, expected.astype(dtype))  # the same pipeline, bit for bit
    side = json.loads((tmp_path / "test_float32.json").read_text())
    assert side["paths"] == list(test.paths) and side["labels"] == [test.class_ids[k] for k in test.labels]
    assert (side["count"], side["dim"], side["skipped"]) == (len(test), 512, [])
    state = checkpoint.load(own_run["checkpoint"])
    assert side["model"] == fingerprint(state, checkpoint.config_of(state), "square")
    assert "images embedded (512-d float32)" in capsys.readouterr().out
    loaded = Embeddings.load(tmp_path / "test_float16.npy")
    assert loaded.vectors.dtype == np.float16 and loaded.labels == tuple(side["labels"])
    for run in range(2):  # decode once into a persistent cache, then map it: the same embeddings
        out = tmp_path / f"cached{run}.npy"
        assert cli.main(["embed", "--checkpoint", str(own_run["checkpoint"]), "--images", images, "--out", str(out),
                         "--device", "cpu", "--cache-dir", str(tmp_path / "cache")]) == 0
        np.testing.assert_array_equal(np.load(out), expected)
    assert len(list((tmp_path / "cache").glob("*.crop.u8"))) == 1


def test_unreadable_images_are_listed_and_skipped_or_stop_the_run_with_strict(own_run, held_out, tmp_path, capsys):
    test, expected = held_out
    folder = tmp_path / "catalogue"
    keep = list(range(6))
    for i in keep:
        (folder / "shelf").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(test.paths[i], folder / "shelf" / f"{i}.jpg")
    (folder / "shelf" / "2_broken.jpg").write_bytes(b"not a jpeg" * 20)
    args = ["embed", "--checkpoint", str(own_run["checkpoint"]), "--images", str(folder), "--device", "cpu"]
    assert cli.main(args + ["--out", str(tmp_path / "shelf.npy")]) == 0
    err = capsys.readouterr().err
    assert "skipped (unreadable): " + str(folder / "shelf" / "2_broken.jpg") in err
    emb = Embeddings.load(tmp_path / "shelf.npy")
    assert [p.rsplit("/", 1)[1] for p in emb.paths] == [f"{i}.jpg" for i in keep]
    assert emb.labels == ("shelf",) * 6 and emb.skipped[0][0].endswith("2_broken.jpg")
    # a batch of 6 (not 64): float rounding of the convolutions may differ in the last bits
    np.testing.assert_allclose(emb.vectors, expected[keep], rtol=0, atol=1e-4 * np.abs(expected).max())
    assert cli.main(args + ["--out", str(tmp_path / "strict.npy"), "--strict"]) == 2
    err = capsys.readouterr().err.split("\r")[-1]  # after the progress bar
    assert err.startswith("fastiaa embed: error: cannot read or decode image") and "2_broken.jpg" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "strict.npy").exists()


def test_image_inputs_label_by_class_folder_or_csv(tmp_path, kanji_root):
    jpeg = load_dataset("kanji", kanji_root).train.paths[0]
    for rel in ("cats/a.jpg", "cats/b.jpg", "dogs/small/c.jpg", "top.jpg"):
        (tmp_path / "dir" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(jpeg, tmp_path / "dir" / rel)
    (tmp_path / "list.csv").write_text("path,label\ndir/top.jpg,owl\n")
    paths, labels = image_inputs([str(tmp_path / "dir"), str(tmp_path / "list.csv"), str(tmp_path / "dir/top.jpg")])
    assert [p.removeprefix(str(tmp_path) + "/") for p in paths] == [
        "dir/cats/a.jpg", "dir/cats/b.jpg", "dir/dogs/small/c.jpg", "dir/top.jpg", "dir/top.jpg", "dir/top.jpg"]
    assert labels == ["cats", "cats", "dogs/small", "", "owl", ""]
    (tmp_path / "empty").mkdir()
    with pytest.raises(MalformedDatasetError, match="no image in"):
        image_inputs([str(tmp_path / "empty")])
    with pytest.raises(FileNotFoundError, match="no image, folder or CSV"):
        image_inputs([str(tmp_path / "absent.jpg")])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither an image"):
        image_inputs([str(tmp_path / "notes.txt")])


def test_embed_input_errors_are_one_line(own_run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    base = ["embed", "--checkpoint", str(own_run["checkpoint"]), "--device", "cpu"]
    for argv, message in (
        (["--images", str(tmp_path / "empty"), "--out", str(tmp_path / "e.npy")], "no image in"),
        (["--images", str(tmp_path), "--out", str(tmp_path / "e.txt")], "embeddings are written as FILE.npy"),
    ):
        assert cli.main(base + argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("fastiaa embed: error:") and message in err and len(err.splitlines()) == 1
    image = load_dataset("folder", own_run["folder"]).test.paths[0]
    assert cli.main(["embed", "--checkpoint", str(tmp_path / "none.pt"), "--images", image,
                     "--out", str(tmp_path / "e.npy")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def test_another_dimension_or_model_is_refused():
    ours = {"backbone": "resnet50", "embedding_size": 512, "resize": "square", "resize_size": 256,
            "image_size": 224, "weights": "0123456789abcdef"}
    require_same_model(dict(ours), "index a", ours, "checkpoint b")
    with pytest.raises(ValueError, match="index a holds 128-d embeddings but checkpoint b gives 512-d ones"):
        require_same_model({**ours, "embedding_size": 128}, "index a", ours, "checkpoint b")
    with pytest.raises(ValueError, match="another model than checkpoint b .weights ffff vs 0123456789abcdef"):
        require_same_model({**ours, "weights": "ffff"}, "index a", ours, "checkpoint b")


@pytest.mark.gpu
def test_gpu_embed_with_either_loader_matches_the_cpu(photo_root, tmp_path):
    """`fastiaa embed --device cuda` (DALI's GPU decoder, or torchvision) against the CPU reference:
    the same images in the same order, embeddings equal up to resampling and float rounding."""
    from fastiaa.config import TrainConfig
    from fastiaa.embeddings import Embedder
    from fastiaa.models import create_model

    cfg = TrainConfig.build(dataset="kanji", data=str(photo_root), backbone="efficientnet_lite0", image_size=48,
                            resize_size=56, eval_batch=32, workers=2, amp="off", pretrained=False)
    torch.manual_seed(0)
    checkpoint.save(tmp_path / "m.pt", {"config": cfg.to_dict(), "model": create_model("efficientnet_lite0", 512,
                                                                                      False).state_dict()})
    paths = load_dataset("kanji", photo_root).test.paths
    cpu = Embedder(tmp_path / "m.pt", "cpu", "torchvision").embed(paths).vectors
    from fastiaa.pipelines import dali

    for loader in ("torchvision",) + (("dali",) if dali._IMPORT_ERROR is None else ()):
        gpu = Embedder(tmp_path / "m.pt", "cuda", loader).embed(paths).vectors
        cosine = (gpu * cpu).sum(1) / np.linalg.norm(gpu, axis=1) / np.linalg.norm(cpu, axis=1)
        assert gpu.shape == cpu.shape and cosine.min() > 0.99, (loader, cosine.min())
