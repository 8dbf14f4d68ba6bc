"""``fastiaa export``: the embedding model of a checkpoint as one file for serving, ONNX or TorchScript
(docs/architecture.md, "Deployment").

The exported graph takes what an image decoder gives: ``uint8 [batch, S, S, 3]`` RGB pixels (S the
run's crop size, the batch dynamic), applies the run's input normalisation (docs/method.md §2,
including BN-Inception's BGR order) and returns the ``[batch, D]`` float32 embeddings that
``fastiaa embed`` computes; resizing and centre-cropping (the ``preprocessing`` entry of the
metadata) are the caller's. The metadata travels inside the file: ONNX ``metadata_props["fastiaa"]``,
TorchScript extra file ``fastiaa.json``.
"""
from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import torch
from torch import nn

from fastiaa import checkpoint, registry, runtime
from fastiaa.data import resize_mode
from fastiaa.embeddings import fingerprint
from fastiaa.pipelines import NORMALIZATIONS

FORMATS = registry.EXPORT_FORMATS
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".ts", ".pt", ".pth")}


class PixelEmbedder(nn.Module):
    """``uint8 [B, S, S, 3]`` RGB pixels -> the normalisation of ``input_space`` -> ``model`` ->
    ``[B, D]`` float32. The pixels' NHWC layout is the channels-last NCHW view the model runs on."""

    def __init__(self, model: nn.Module, input_space: str):
        super().__init__()
        normalization = NORMALIZATIONS[input_space]
        mean, std = normalization.pixel_mean_std()
        self.model, self.bgr = model, normalization.bgr
        # the affine map of fastiaa.pipelines (normalize_nhwc): x * (1 / s) + (-m / s)
        self.register_buffer("scale", torch.tensor(1.0 / std, dtype=torch.float32))
        self.register_buffer("shift", torch.tensor(-mean / std, dtype=torch.float32))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            pixels = pixels.flip(-1)
        return self.model((pixels.float() * self.scale + self.shift).permute(0, 3, 1, 2))


def export(checkpoint_path: str | os.PathLike, fmt: str, out: str | os.PathLike) -> dict:
    """Write the model of a ``fastiaa train`` checkpoint to ``out`` as ``fmt`` ("onnx" |
    "torchscript"), atomically, and check the file against the PyTorch model on a batch of 3.

    Returns:
        the metadata written into the file, with ``max_abs_difference`` of that check.

    Raises:
        FileNotFoundError: no checkpoint. ValueError: unknown format, an ``out`` not named as
        ``SUFFIXES`` says, not a fastiaa checkpoint, an unknown backbone, or a file that disagrees
        with the PyTorch model by more than 1e-3.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not str(out).lower().endswith(SUFFIXES[fmt]):
        raise ValueError(f"--out {out}: a {fmt} file's name ends in {' or '.join(SUFFIXES[fmt])}")
    state = checkpoint.load(checkpoint_path)
    cfg = checkpoint.config_of(state).replace(pretrained=False, device="cpu", channels_last=fmt == "torchscript")
    model = runtime.checkpoint_model(state, cfg, torch.device("cpu"))
    wrapped = PixelEmbedder(model, model.input_space).eval()
    size, resize = cfg.data.image_size, resize_mode(cfg.data.dataset)
    meta = {"format": "fastiaa-export/1", "model": fingerprint(state, cfg, resize),
            "input": f"pixels: uint8 [batch, {size}, {size}, 3] RGB", "output": f"embeddings: float32 [batch, "
            f"{cfg.model.embedding_size}], un-normalised (cosine similarity: L2-normalise them)",
            "preprocessing": (f"resize to {cfg.data.resize_size}x{cfg.data.resize_size}" if resize == "square" else
                              f"resize the shorter side to {cfg.data.resize_size}") + f", centre crop {size}x{size}"}
    example = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8))
    with torch.no_grad():
        expected = wrapped(example).numpy()
        if fmt == "onnx":
            got = _onnx(wrapped, example, out, meta)
        else:
            got = _torchscript(wrapped, example, out, meta)
    meta["max_abs_difference"] = float(np.abs(got - expected).max())
    if meta["max_abs_difference"] > 1e-3:
        raise ValueError(f"the exported {fmt} model differs from PyTorch by {meta['max_abs_difference']:.2e} "
                         f"on random pixels ({out} written; do not serve it)")
    return meta


def _onnx(wrapped: nn.Module, example: torch.Tensor, out, meta: dict) -> np.ndarray:
    import onnx
    import onnxruntime

    batch = torch.export.Dim("batch", min=1)
    program = torch.onnx.export(wrapped, (example,), dynamo=True, input_names=["pixels"],
                                output_names=["embeddings"], dynamic_shapes=({0: batch},), verbose=False)
    proto = program.model_proto
    onnx.helper.set_model_props(proto, {"fastiaa": json.dumps(meta)})
    data = proto.SerializeToString()
    checkpoint.atomic_write(out, lambda f: f.write(data))
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(None, {"pixels": example.numpy()})[0]


def _torchscript(wrapped: nn.Module, example: torch.Tensor, out, meta: dict) -> np.ndarray:
    with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; it still loads everywhere
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(wrapped, example, check_trace=False)
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer, _extra_files={"fastiaa.json": json.dumps(meta)})
        checkpoint.atomic_write(out, lambda f: f.write(buffer.getvalue()))
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
    return loaded(example).numpy()
