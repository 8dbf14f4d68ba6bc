"""fastiaa.export and `fastiaa export`: ONNX (run by onnxruntime on the CPU) and TorchScript files that
give the PyTorch model's embeddings of real demo images, with the input normalisation inside."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from fastiaa import checkpoint, cli, runtime
from fastiaa.data import load_dataset
from fastiaa.pipelines import NORMALIZATIONS
from fastiaa.pipelines.core import centre_crop_origin, normalize_nhwc

onnx = pytest.importorskip("onnx")  # the GPU check's environment may lack them
onnxruntime = pytest.importorskip("onnxruntime")


def eval_pixels(paths, resize_size: int, crop: int) -> torch.Tensor:
    """uint8 [N, crop, crop, 3] RGB: the eval transform of docs/method.md §2 ("square" resize, centre crop)."""
    out = []
    for path in paths:
        with Image.open(path) as im:
            image = TF.resize(im.convert("RGB"), [resize_size, resize_size], antialias=True)
        (top,), (left,) = centre_crop_origin([image.height], [image.width], crop)
        out.append(np.asarray(image.crop((left, top, left + crop, top + crop))))
    return torch.from_numpy(np.stack(out))


def test_onnx_and_torchscript_give_the_pytorch_embeddings(own_run, tmp_path, capsys):
    ckpt = str(own_run["checkpoint"])
    state = checkpoint.load(ckpt)
    cfg = checkpoint.config_of(state).replace(device="cpu")
    model = runtime.checkpoint_model(state, cfg, torch.device("cpu"))  # as fastiaa runs it: channels-last
    pixels = eval_pixels(load_dataset("folder", own_run["folder"]).test.paths[:17], cfg.data.resize_size,
                         cfg.data.image_size)
    with torch.no_grad():
        expected = model(normalize_nhwc(pixels, NORMALIZATIONS[model.input_space], torch.float32)).numpy()

    assert cli.main(["export", "--checkpoint", ckpt, "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "input   pixels: uint8 [batch, 48, 48, 3] RGB (resize to 56x56, centre crop 48x48)" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (pixels, pixels[:1]):  # a dynamic batch size
        (got,) = session.run(None, {"pixels": batch.numpy()})
        assert got.shape == (len(batch), 512) and np.abs(got - expected[: len(batch)]).max() <= 1e-4
    meta = json.loads({p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}["fastiaa"])
    assert meta["model"]["embedding_size"] == 512 and meta["preprocessing"] == "resize to 56x56, centre crop 48x48"

    assert cli.main(["export", "--checkpoint", ckpt, "--format", "torchscript", "--out", str(tmp_path / "m.ts")]) == 0
    extra = {"fastiaa.json": ""}
    with pytest.warns(FutureWarning):  # torch >= 2.10 deprecates TorchScript; its files still load
        scripted = torch.jit.load(str(tmp_path / "m.ts"), _extra_files=extra)
    with torch.no_grad():
        for batch in (pixels, pixels[:5]):
            assert np.abs(scripted(batch).numpy() - expected[: len(batch)]).max() <= 1e-4
    assert json.loads(extra["fastiaa.json"])["model"] == meta["model"]


def test_export_of_an_unknown_backbone_is_refused(own_run, tmp_path, capsys):
    state = checkpoint.load(own_run["checkpoint"])
    state["config"]["model"]["backbone"] = "vgg16"
    checkpoint.save(tmp_path / "vgg.pt", state)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "vgg.pt"), "--format", "onnx",
                     "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastiaa export: error: unknown backbone 'vgg16'; choose one of") and len(err.splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("fmt, out", [("onnx", "m.ts"), ("torchscript", "m.onnx")])
def test_export_to_a_file_named_for_another_format_is_refused(own_run, tmp_path, capsys, fmt, out):
    assert cli.main(["export", "--checkpoint", str(own_run["checkpoint"]), "--format", fmt,
                     "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert f"a {fmt} file's name ends in" in err and len(err.splitlines()) == 1
    assert not (tmp_path / out).exists()
