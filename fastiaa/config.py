"""Run configuration: :class:`TrainConfig` in groups (data, model, optimisation, IAA, evaluation,
runtime) with the official code's defaults, and the settings of the authors' published commands.

Field names are the authors' ``run.py`` flag names (``intra_lamda``, ``aug_num``, ...), unique across
the groups, so a flat ``{name: value}`` mapping (a preset, the command line, a sweep) places every
value in its group (:meth:`TrainConfig.build`, :meth:`TrainConfig.replace`). This module imports
nothing heavy: the command line builds its parser from it without importing torch.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from fastiaa import registry


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "kanji"
    data: str = "data/kanji"
    loader: str = "torchvision"      # torchvision | dali
    workers: int = 2                 # loader threads / processes
    image_size: int = 224            # crop fed to the model (docs/method.md §2)
    resize_size: int = 256           # resize before the crop
    cache: str = "auto"              # decode once: off | auto | ram | device (docs/architecture.md, "Cache")
    cache_gib: float | None = None   # the cache's memory budget (None: half of the free memory)
    cache_dir: str | None = None     # a persistent, memory-mapped cache shared by later runs


@dataclass(frozen=True)
class ModelConfig:
    backbone: str = "bninception"
    pretrained: bool = True
    weight_path: str | None = None   # None: torch's hub cache (~/.cache/torch/hub/checkpoints)
    embedding_size: int = 512


@dataclass(frozen=True)
class OptimConfig:
    loss: str = "ms"
    lr: float = 5e-5
    head_lr_mult: float = 1.0        # the paper: the embedding layer's lr x10
    weight_decay: float = 1e-5
    epochs: int = 100
    lr_decay_epochs: tuple[int, ...] = (40, 60, 80)
    lr_decay_gamma: float = 0.2
    batch: int = 128
    num_image_per_class: int = 4
    iter_per_epoch: int = 300        # capped at len(train) // batch

    @property
    def loss_name(self) -> str:
        """The registry name of :attr:`loss` (the authors write "MS", "Contrastive")."""
        return registry.loss_name(self.loss)


@dataclass(frozen=True)
class IAAConfig:
    """The method's settings (docs/method.md §3-5); :class:`fastiaa.IAA` takes them."""

    intra: bool = True               # synthesis on (off: the plain loss)
    intra_lamda: float = 0.8         # λ of Eq. 17
    aug_num: int = 3                 # M, synthetic samples per embedding
    start_epoch: int = 30            # the first refresh follows this epoch
    warmup_epoch: int = 0            # epochs between the first refresh and synthesis
    update_every_M_epoch: int = 2    # refresh period
    momentum: float = 0.2
    covariance: str = "diag"         # diag | full (dense) | lowrank | auto (full: dense or low-rank by size)
    dense_full_limit_gib: float = 2.0  # auto: low-rank when the dense [C, D, D] would exceed this
    correction: str = "auto"         # auto (train classes > 1000) | on | off
    num_neighbor: int = 25
    beta: float = 0.1
    gamma: float = 0.1
    tau: float = 40.0
    # official-code behaviours (docs/method.md §6), off by default
    official_uncorrected_sampling: bool = False
    official_repeated_sqrt: bool = False
    official_zero_mean_singletons: bool = False
    official_sentinel_normalization: bool = False


@dataclass(frozen=True)
class EvalConfig:
    recall: tuple[int, ...] | None = None   # None: the dataset's standard K
    map: bool = True                        # MAP@R and R-Precision
    eval_every: int = 1                     # 0: never
    eval_batch: int = 128


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    amp: str = "auto"                # auto | off | bf16 | fp16
    channels_last: bool = True
    kernels: str = "auto"            # auto | triton | torch
    work_memory_mib: float = 256.0   # fastiaa.memory: temporary blocks of chunked computations
    log_every: int = 10              # steps between host reads of the loss (progress bar, NaN check)
    seed: int = 0
    save_dir: str = "runs"
    name: str | None = None
    resume: bool = False
    allow_unusual: bool = False      # accept settings outside the ranges the method is meant for


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


GROUPS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "iaa": IAAConfig, "eval": EvalConfig,
          "runtime": RuntimeConfig}
GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
"""Field name -> its group (the names are unique across groups)."""
TUPLE_FIELDS = ("lr_decay_epochs", "recall")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs; saved as ``config.json`` in the run directory."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    iaa: IAAConfig = field(default_factory=IAAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    @classmethod
    def build(cls, **values) -> "TrainConfig":
        """The defaults with flat ``values`` (field names of any group) applied.

        Raises:
            ValueError: a name that is no field (the message lists the valid ones).
        """
        return cls().replace(**values)

    def replace(self, **values) -> "TrainConfig":
        """A copy with flat ``values`` applied (see :meth:`build`)."""
        unknown = sorted(set(values) - set(GROUP_OF))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; valid: {sorted(GROUP_OF)}")
        for key in TUPLE_FIELDS:
            if values.get(key) is not None:
                values[key] = tuple(values[key])
        groups = {}
        for group in GROUPS:
            mine = {k: v for k, v in values.items() if GROUP_OF[k] == group}
            groups[group] = dataclasses.replace(getattr(self, group), **mine) if mine else getattr(self, group)
        return TrainConfig(**groups)

    def flat(self) -> dict:
        """``{field name: value}`` over all groups."""
        return {k: v for group in GROUPS for k, v in dataclasses.asdict(getattr(self, group)).items()}

    def differences(self, other: "TrainConfig", keys=None) -> list[str]:
        """``--flag other's -> ours`` for every setting (of ``keys``; default all) where ``other`` differs."""
        mine, theirs = self.flat(), other.flat()
        return [f"--{key.replace('_', '-')} {theirs[key]} -> {mine[key]}" for key in (keys or mine)
                if theirs[key] != mine[key]]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_dict(self) -> dict:
        """``{group: {field: value}}``, as stored in checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: not a fastiaa configuration (unknown groups or settings).
        """
        if not isinstance(raw, dict) or not set(raw) <= set(GROUPS) or not all(isinstance(g, dict) for g in raw.values()):
            raise ValueError(f"not a fastiaa training configuration (groups {sorted(GROUPS)} expected)")
        return cls.build(**{k: v for group in raw.values() for k, v in group.items()})

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        """Parse :meth:`to_json` output (``config.json``)."""
        return cls.from_dict(json.loads(text))

    def check(self) -> "TrainConfig":
        """Refuse settings that cannot train (or not as the method means), before anything runs.

        Returns:
            self.

        Raises:
            ValueError: the first bad setting, named by its flag, with the accepted range; ranges that
                are only unusual (λ outside (0, 1], M above 8) pass with ``--allow-unusual``.
        """
        v = self.flat()
        rules = [  # (flag, value, ok, the range in words)
            ("lr", v["lr"], _finite(v["lr"]) and v["lr"] > 0, "a finite number > 0"),
            ("head-lr-mult", v["head_lr_mult"], _finite(v["head_lr_mult"]) and v["head_lr_mult"] > 0 and
             v["lr"] * v["head_lr_mult"] < 3e38, "a finite number > 0 (and --lr x --head-lr-mult within float32)"),
            ("weight_decay", v["weight_decay"], _finite(v["weight_decay"]) and v["weight_decay"] >= 0,
             "a finite number >= 0"),
            ("lr-decay-gamma", v["lr_decay_gamma"], _finite(v["lr_decay_gamma"]) and 0 < v["lr_decay_gamma"] <= 1,
             "in (0, 1]"),
            ("lr-decay-epochs", v["lr_decay_epochs"], all(e >= 1 for e in v["lr_decay_epochs"]), "epochs >= 1"),
            ("epochs", v["epochs"], v["epochs"] >= 1, ">= 1"),
            ("batch", v["batch"], v["batch"] >= 2, ">= 2"),
            ("num_image_per_class", v["num_image_per_class"], 2 <= v["num_image_per_class"] <= v["batch"],
             "between 2 (an anchor needs a positive) and --batch"),
            ("iter-per-epoch", v["iter_per_epoch"], v["iter_per_epoch"] >= 1, ">= 1"),
            ("eval_batch", v["eval_batch"], v["eval_batch"] >= 1, ">= 1"),
            ("embedding-size", v["embedding_size"], v["embedding_size"] >= 1, ">= 1"),
            ("image-size", v["image_size"], 1 <= v["image_size"] <= v["resize_size"], "between 1 and --resize-size"),
            ("workers", v["workers"], v["workers"] >= 0, ">= 0"),
            ("intra_lamda", v["intra_lamda"], _finite(v["intra_lamda"]) and (0 < v["intra_lamda"] <= 1 or
                                                                             v["allow_unusual"] and v["intra_lamda"] >= 0),
             "in (0, 1] (the paper uses 0.5-0.8; --allow-unusual accepts any lambda >= 0)"),
            ("aug_num", v["aug_num"], 1 <= v["aug_num"] <= 8 or v["allow_unusual"] and v["aug_num"] >= 1,
             "between 1 and 8 (the paper uses 2-4; --allow-unusual accepts more)"),
            ("start_epoch", v["start_epoch"], v["start_epoch"] >= 0, ">= 0"),
            ("warmup_epoch", v["warmup_epoch"], v["warmup_epoch"] >= 0, ">= 0"),
            ("update_every_M_epoch", v["update_every_M_epoch"], v["update_every_M_epoch"] >= 1, ">= 1"),
            ("momentum", v["momentum"], _finite(v["momentum"]) and 0 <= v["momentum"] <= 1, "in [0, 1]"),
            ("num_neighbor", v["num_neighbor"], v["num_neighbor"] >= 1, ">= 1"),
            ("beta", v["beta"], _finite(v["beta"]) and v["beta"] >= 0, "a finite number >= 0"),
            ("gamma", v["gamma"], _finite(v["gamma"]) and 0 <= v["gamma"] <= 1, "in [0, 1]"),
            ("tau", v["tau"], _finite(v["tau"]) and v["tau"] > 0, "a finite number > 0"),
            ("dense_full_limit_gib", v["dense_full_limit_gib"],
             _finite(v["dense_full_limit_gib"]) and v["dense_full_limit_gib"] >= 0, "a finite number >= 0"),
            ("recall", v["recall"], v["recall"] is None or all(k >= 1 for k in v["recall"]), "values >= 1"),
            ("eval-every", v["eval_every"], v["eval_every"] >= 0, ">= 0"),
            ("work-memory-mib", v["work_memory_mib"], _finite(v["work_memory_mib"]) and v["work_memory_mib"] > 0,
             "a finite number > 0"),
            ("log-every", v["log_every"], v["log_every"] >= 1, ">= 1"),
            ("cache-gib", v["cache_gib"], v["cache_gib"] is None or _finite(v["cache_gib"]) and v["cache_gib"] > 0,
             "a finite number > 0"),
        ]
        for flag, value, ok, accepted in rules:
            if not ok:
                raise ValueError(f"--{flag} {value}: must be {accepted}")
        return self

    def run_stem(self) -> str:
        """``<dataset>_<backbone>_<loss>_<iaa|base>``: the default run name without its seed."""
        return f"{self.data.dataset}_{self.model.backbone}_{self.optim.loss_name}_{'iaa' if self.iaa.intra else 'base'}"

    def run_dir(self) -> Path:
        """``save_dir / name``, the name defaulting to ``<run_stem>_s<seed>``."""
        return Path(self.runtime.save_dir) / (self.runtime.name or f"{self.run_stem()}_s{self.runtime.seed}")


# Settings of the authors' published commands (docs/method.md §7), as flat field names.
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
    """The authors' settings for ``dataset`` (docs/method.md §7), adjusted for ``backbone`` and ``loss``.

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
    if registry.loss_name(values["loss"]) == "contrastive":
        if dataset == "cub200":
            values["lr"] = 3e-5
        if big and values["backbone"] == "googlenet":
            values["aug_num"] = 2
    return values
