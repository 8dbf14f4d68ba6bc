"""Run configuration: one dataclass with the authors' defaults, plus per-dataset presets.

Defaults are the official code's (spec §7); ``PRESETS`` holds the settings of the authors'
published commands, which ``make train DATASET=...`` and ``fastiaa train --preset`` apply.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

LOSSES = ("ms", "contrastive", "triplet")
# the authors spell losses "MS" and "Contrastive"
LOSS_ALIASES = {"ms": "ms", "multisimilarity": "ms", "contrastive": "contrastive", "triplet": "triplet"}


@dataclass
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` in the run directory."""

    # data and model
    dataset: str = "kanji"
    data: str = "data/kanji"
    backbone: str = "bninception"
    pretrained: bool = True
    weight_path: str | None = None   # None: torch hub cache (~/.cache/torch/hub/checkpoints)
    embedding_size: int = 512
    image_size: int = 224            # crop size fed to the model (spec §2: 224)
    resize_size: int = 256           # resize before the crop (spec §2: 256)
    loader: str = "torchvision"      # torchvision | dali
    workers: int = 2
    # optimisation (spec §7, official defaults)
    loss: str = "ms"
    lr: float = 5e-5
    head_lr_mult: float = 1.0        # paper: the embedding layer's lr x10
    weight_decay: float = 1e-5
    epochs: int = 100
    lr_decay_epochs: tuple[int, ...] = (40, 60, 80)
    lr_decay_gamma: float = 0.2
    batch: int = 128
    eval_batch: int = 128
    num_image_per_class: int = 4
    iter_per_epoch: int = 300        # capped at len(train) // batch (spec §2)
    # IAA (spec §3-5)
    intra: bool = True
    intra_lamda: float = 0.8
    aug_num: int = 3
    start_epoch: int = 30
    warmup_epoch: int = 0
    update_every_M_epoch: int = 2
    momentum: float = 0.2
    diag: bool = True
    full_covariance: str = "auto"    # dense | lowrank | auto (low-rank when dense exceeds the limit)
    dense_full_limit_gib: float = 2.0
    correction: str = "auto"         # auto (train classes > 1000) | on | off
    num_neighbor: int = 25
    beta: float = 0.1
    gamma: float = 0.1
    tau: float = 40.0
    # official-code behaviours (spec §4-5 quirks), off by default
    official_uncorrected_sampling: bool = False
    official_repeated_sqrt: bool = False
    official_zero_mean_singletons: bool = False
    official_sentinel_normalization: bool = False
    # evaluation
    recall: tuple[int, ...] | None = None   # None: the dataset's standard K
    map: bool = True
    eval_every: int = 1
    # execution
    device: str = "auto"
    amp: str = "auto"                # auto | off | bf16 | fp16
    channels_last: bool = True
    kernels: str = "auto"            # auto | triton | torch
    seed: int = 0
    save_dir: str = "runs"
    name: str | None = None
    resume: bool = False

    @property
    def loss_name(self) -> str:
        return LOSS_ALIASES[self.loss.lower()]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        raw = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys: {sorted(known)}")
        for key in ("lr_decay_epochs", "recall"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        return cls(**raw)

    def run_dir(self) -> Path:
        name = self.name or f"{self.dataset}_{self.backbone}_{self.loss_name}_{'iaa' if self.intra else 'base'}_s{self.seed}"
        return Path(self.save_dir) / name


# Settings of the authors' published commands (spec §7). Keys are TrainConfig fields.
PRESETS: dict[str, dict] = {
    "cub200": dict(dataset="cub200", data="MyDataset", backbone="googlenet", loss="ms",
                   intra_lamda=0.8, aug_num=3, num_image_per_class=4),
    "cars196": dict(dataset="cars196", data="MyDataset", backbone="googlenet", loss="ms",
                    intra_lamda=0.8, aug_num=3, num_image_per_class=4),
    "stanford": dict(dataset="stanford", data="MyDataset", backbone="googlenet", loss="ms",
                     batch=180, lr=1e-4, intra_lamda=0.6, aug_num=3, num_image_per_class=3),
    "inshop": dict(dataset="inshop", data="MyDataset", backbone="googlenet", loss="ms",
                   batch=180, lr=1e-4, intra_lamda=0.6, aug_num=3, num_image_per_class=3),
    # the CPU demo: real kanji glyphs (SOP-like: many classes, few images each), sized so the
    # whole run fits in minutes on 2 CPU cores; the schedule is the official one, compressed.
    "kanji": dict(dataset="kanji", data="data/kanji", backbone="efficientnet_lite0", loss="ms",
                  image_size=96, resize_size=112, batch=96, eval_batch=256,
                  num_image_per_class=3, lr=1e-4, head_lr_mult=10.0, epochs=6,
                  lr_decay_epochs=(5,), iter_per_epoch=40, intra_lamda=0.6, aug_num=3,
                  start_epoch=2, update_every_M_epoch=2, amp="auto"),
}


def preset_overrides(dataset: str, backbone: str | None = None, loss: str | None = None) -> dict:
    """The authors' settings for ``dataset`` (spec §7), adjusted for ``backbone`` and ``loss``.

    Raises:
        KeyError: unknown dataset (the message lists the known ones).
    """
    if dataset not in PRESETS:
        raise KeyError(f"no preset for dataset {dataset!r}; known: {sorted(PRESETS)}")
    values = dict(PRESETS[dataset])
    if backbone is not None:
        values["backbone"] = backbone
    if loss is not None:
        values["loss"] = loss
    big = dataset in ("stanford", "inshop")
    if big and values["backbone"] in ("bninception", "resnet50"):
        values.update(batch=256, lr=1e-4, intra_lamda=0.5, aug_num=3)
    if LOSS_ALIASES[values["loss"].lower()] == "contrastive":
        if dataset == "cub200":
            values["lr"] = 3e-5
        if big and values["backbone"] == "googlenet":
            values["aug_num"] = 2
    return values
