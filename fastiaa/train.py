"""The training loop: steps, statistics refreshes, evaluation, checkpoints and records.

One epoch (spec §2-7, following the official schedule):
  1. refresh the class statistics over the whole train set when
     ``epoch > start_epoch`` and ``(epoch - start_epoch - 1) % update_every_M_epoch == 0``;
  2. train ``iter_per_epoch`` balanced batches; from ``epoch > start_epoch + warmup_epoch`` on,
     every batch is augmented with ``aug_num`` synthetic embeddings per original (Eq. 17);
  3. step the learning-rate schedule, evaluate on the held-out classes, write records and
     checkpoints (atomically), so a killed run resumes from its last finished epoch.

This module is the only one that knows that order; every other room is called through its
public function.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from fastiaa import checkpoint, distributed, kernels, report
from fastiaa.config import TrainConfig
from fastiaa.data import BalancedBatchSampler, ImageSet, load_dataset
from fastiaa.evaluation import retrieval_metrics
from fastiaa.iaa import (ClassStatistics, LowRankStatistics, class_moments, lambda_schedule, sampling_factor,
                         synthesize)
from fastiaa.losses import ContrastiveLoss, MultiSimilarityLoss, TripletLoss
from fastiaa.models import create_model
from fastiaa.pipelines import NORMALIZATIONS, build_eval_loader, build_train_loader

LOSSES = {"ms": MultiSimilarityLoss, "contrastive": ContrastiveLoss, "triplet": TripletLoss}
# settings a resumed run must share with its checkpoint (they fix the shapes of what it holds)
SHAPE_FIELDS = ("dataset", "backbone", "embedding_size", "diag", "full_covariance", "loss")


class NonFiniteError(FloatingPointError):
    """A loss or embedding stopped being finite; the message names the epoch and step."""


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU.

    Raises:
        ValueError: a CUDA device was asked for on a machine without one.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is visible; use --device cpu")
    return device


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--amp``: ``auto`` is bf16 (fp16 on CUDA cards without bf16)."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or device.type == "cpu":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _shard_images(images: ImageSet, world: distributed.World) -> ImageSet:
    part = distributed.shard(len(images), world)
    return dataclasses.replace(images, paths=images.paths[part], labels=images.labels[part])


@torch.no_grad()
def embed(model, loader, device, amp, world, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings ``[N, D]`` float32 (CPU) and labels ``[N]`` int64 of every image the loaders
    of all ranks yield, in dataset order.

    Raises:
        NonFiniteError: the model produced a NaN or infinite embedding.
    """
    model.eval()
    feats, labels = [], []
    for batch in tqdm(loader, desc=what, leave=False, disable=not world.is_main, dynamic_ncols=True):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            feats.append(model(batch.images).float())
        labels.append(batch.labels.to(device))
    z = torch.cat(feats) if feats else torch.zeros(0, 1, device=device)
    y = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=device)
    z, y = distributed.all_gather_varsize(z, world), distributed.all_gather_varsize(y, world)
    if not torch.isfinite(z).all():
        raise NonFiniteError(f"non-finite embeddings while computing {what}")
    return z.cpu(), y.cpu()


def _merge_moments(count, mean, m2, world):
    """Combine per-rank class moments (Chan et al.'s parallel rule) into the global ones."""
    if not world.distributed:
        return count, mean, m2
    n = distributed.all_reduce_sum(count.clone().double(), world)
    total = distributed.all_reduce_sum(mean.double() * count.double()[:, None], world)
    global_mean = total / n.clamp(min=1)[:, None]
    delta = mean.double() - global_mean
    spread = (count.double()[:, None] * delta * delta if m2.dim() == 2
              else torch.einsum("c,ci,cj->cij", count.double(), delta, delta))
    m2 = distributed.all_reduce_sum(m2.double() + spread, world)
    return n.long(), global_mean.float(), m2.float()


class Trainer:
    """Holds the pieces of one run and runs its epochs (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.world = distributed.init(self.device.type)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.amp = autocast_dtype(cfg.amp, self.device)
        kernels.set_backend(cfg.kernels)
        checkpoint.seed_everything(cfg.seed)
        self.run_dir = cfg.run_dir()

        self.dataset = load_dataset(cfg.dataset, cfg.data)
        self.ks = tuple(cfg.recall) if cfg.recall else self.dataset.recall_ks
        train = self.dataset.train
        if cfg.batch % self.world.world_size:
            raise ValueError(f"--batch {cfg.batch} must be a multiple of the number of processes "
                             f"({self.world.world_size})")
        iterations = min(len(train) // cfg.batch, cfg.iter_per_epoch)
        if iterations < 1:
            raise ValueError(f"--batch {cfg.batch} is larger than the train set ({len(train)} images)")
        sampler = BalancedBatchSampler(train.labels, cfg.batch, cfg.num_image_per_class, iterations, cfg.seed)

        model = create_model(cfg.backbone, cfg.embedding_size, cfg.pretrained, cfg.weight_path)
        model = model.to(self.device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        self.model = model
        self.ddp = DistributedDataParallel(model) if self.world.distributed else model

        norm = NORMALIZATIONS[model.input_space]
        geometry = dict(normalization=norm, resize=self.dataset.resize, resize_size=cfg.resize_size,
                        crop_size=cfg.image_size, num_threads=cfg.workers, device=str(self.device))
        self.train_loader = build_train_loader(cfg.loader, train, sampler, seed=cfg.seed,
                                               shard=(self.world.rank, self.world.world_size), **geometry)
        evals = {"train": train, "test": self.dataset.test, "query": self.dataset.query,
                 "gallery": self.dataset.gallery}
        self.eval_loaders = {
            key: build_eval_loader(cfg.loader, _shard_images(images, self.world), cfg.eval_batch, **geometry)
            for key, images in evals.items() if images is not None
        }

        head = list(model.head_parameters())
        self.optimizer = torch.optim.Adam(
            [{"params": list(model.backbone_parameters()), "lr": cfg.lr},
             {"params": head, "lr": cfg.lr * cfg.head_lr_mult}],
            weight_decay=cfg.weight_decay, fused=self.device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(cfg.lr_decay_epochs),
                                                              cfg.lr_decay_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.criterion = LOSSES[cfg.loss_name]()

        self.stats = self._statistics(train.num_classes)
        self.correct = cfg.correction == "on" or (cfg.correction == "auto" and train.num_classes > 1000)
        self.factor = None
        # synthesis noise: per-rank seeds from the run seed (a CPU generator: no device sync per step)
        self.generator = torch.Generator().manual_seed(cfg.seed * 1009 + self.world.rank)
        self.log = report.MetricsLog(self.run_dir / "metrics.jsonl")
        self.first_epoch = 1
        self.best: dict = {}

    def _statistics(self, num_classes: int):
        """The class-statistics estimator: diagonal, dense full, or (full covariance too large
        for ``dense_full_limit_gib``) the exact low-rank form of :class:`LowRankStatistics`."""
        cfg = self.cfg
        dense_gib = num_classes * cfg.embedding_size**2 * 4 / 2**30
        self.low_rank = not cfg.diag and (cfg.full_covariance == "lowrank" or
                                          (cfg.full_covariance == "auto" and dense_gib > cfg.dense_full_limit_gib))
        if self.low_rank:
            quirks = [f for f in ("official_zero_mean_singletons", "official_sentinel_normalization")
                      if getattr(cfg, f)]
            if quirks:
                raise ValueError(f"{quirks} are not offered with the low-rank full covariance; "
                                 "use --diag 1 or --full-covariance dense")
            return LowRankStatistics(num_classes, cfg.embedding_size, cfg.momentum, device=self.device)
        return ClassStatistics(num_classes, cfg.embedding_size, covariance="diag" if cfg.diag else "full",
                               momentum=cfg.momentum, device=self.device)

    # -- pieces of an epoch ---------------------------------------------------------------
    def refresh(self, epoch: int) -> None:
        """Embed the whole train set and fold its statistics into the estimator (spec §3-4)."""
        # the low-rank form keeps the centred embeddings themselves: every rank needs all of them;
        # otherwise each rank's shard gives class moments that are merged across ranks
        world = self.world if self.low_rank else distributed.World()
        z, y = embed(self.model, self.eval_loaders["train"], self.device, self.amp, world,
                     f"refresh statistics (epoch {epoch})")
        self.fold_statistics(z, y)

    def fold_statistics(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Fold train embeddings ``[N, D]`` float32 with labels ``[N]`` into the class statistics
        (this rank's shard, or all of them for the low-rank form) and recompute the sampling factor."""
        z, y = embeddings.to(self.device), labels.to(self.device)
        if self.low_rank:
            self.stats.update(z, y)
        else:
            moments = class_moments(z, y, self.stats.num_classes, not self.cfg.diag)
            self.stats.update_from_moments(*_merge_moments(*moments, self.world))
        self._refresh_factor()

    def _refresh_factor(self) -> None:
        cfg = self.cfg
        correct = self.correct and not cfg.official_uncorrected_sampling
        options = dict(num_neighbors=cfg.num_neighbor, beta=cfg.beta, gamma=cfg.gamma, tau=cfg.tau)
        if self.low_rank:
            self.factor = self.stats.corrected(**options) if correct else self.stats.factor()
            return
        cov = (self.stats.corrected(**options, official_zero_mean_singletons=cfg.official_zero_mean_singletons,
                                    official_sentinel_normalization=cfg.official_sentinel_normalization)
               if correct else self.stats.covariance)
        self.factor = sampling_factor(cov)

    def train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        self.ddp.train()
        self.train_loader.set_epoch(epoch)
        synth = cfg.intra and epoch > cfg.start_epoch + cfg.warmup_epoch and self.factor is not None
        lam = lambda_schedule(cfg.intra_lamda, epoch, cfg.epochs)
        losses, images, start = [], 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                   disable=not self.world.is_main, dynamic_ncols=True)
        for step, batch in enumerate(bar, 1):
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                z = self.ddp(batch.images).float()
            labels = batch.labels.to(self.device)
            synthetic = (synthesize(z, labels, self.factor, lam, cfg.aug_num, generator=self.generator,
                                    official_repeated_sqrt=cfg.official_repeated_sqrt) if synth else None)
            z_all = distributed.all_gather_grad(z, self.world)
            labels_all = distributed.all_gather_varsize(labels, self.world)
            if synthetic is not None:  # gather along the batch dimension, keeping the [M, B, D] layout
                synthetic = distributed.all_gather_grad(synthetic.transpose(0, 1), self.world).transpose(0, 1)
                synthetic = F.normalize(synthetic, dim=-1)
            loss = self.criterion(F.normalize(z_all, dim=-1), labels_all, synthetic)
            finite = torch.isfinite(loss) & torch.isfinite(z).all()  # a NaN embedding can hide from the loss
            if distributed.any_rank(not finite.item(), self.world, self.device):
                raise NonFiniteError(f"non-finite loss or embeddings at epoch {epoch}, step {step}; "
                                     "lower --lr or use --amp off")
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            losses.append(loss.item())
            images += len(labels_all)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", synth="on" if synth else "off")
        seconds = time.perf_counter() - start
        self.scheduler.step()
        return {"loss": sum(losses) / len(losses), "images_per_s": images / seconds, "train_s": seconds,
                "lambda": lam if synth else 0.0, "lr": self.optimizer.param_groups[0]["lr"]}

    def evaluate(self) -> dict:
        """Recall@K / MAP@R / R-Precision on the held-out classes (spec §8), on every rank."""
        what = "evaluate"
        if "query" in self.eval_loaders:  # In-Shop: queries against the gallery, by item id
            q, ql = embed(self.model, self.eval_loaders["query"], self.device, self.amp, self.world, what + " query")
            g, gl = embed(self.model, self.eval_loaders["gallery"], self.device, self.amp, self.world,
                          what + " gallery")
            metrics = retrieval_metrics(q, ql, g, gl, ks=self.ks, map_at_r=self.cfg.map) if self.world.is_main else None
        else:
            z, y = embed(self.model, self.eval_loaders["test"], self.device, self.amp, self.world, what)
            metrics = retrieval_metrics(z, y, ks=self.ks, map_at_r=self.cfg.map) if self.world.is_main else None
        return distributed.broadcast_object(metrics, self.world)

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        return {"epoch": epoch, "config": dataclasses.asdict(self.cfg), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "statistics": self.stats.state_dict(),
                "generator": self.generator.get_state(), "rng": checkpoint.rng_state(), "best": self.best,
                "world_size": self.world.world_size}

    def resume(self) -> None:
        state = checkpoint.load(self.run_dir / "last.pt", map_location=self.device)
        changed = [f"--{key.replace('_', '-')} {state['config'][key]} -> {getattr(self.cfg, key)}"
                   for key in SHAPE_FIELDS if state["config"].get(key) != getattr(self.cfg, key)]
        if changed:
            raise ValueError(f"--resume: {self.run_dir / 'last.pt'} was trained with other settings "
                             f"({'; '.join(changed)}); resume with the run's own settings or start a new --name")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.stats.load_state_dict(state["statistics"])
        if state["world_size"] == self.world.world_size:
            self.generator.set_state(state["generator"].cpu())
            checkpoint.set_rng_state(state["rng"])
        self.best = state["best"]
        self.first_epoch = state["epoch"] + 1
        if int((self.stats.stats if self.low_rank else self.stats).count.sum()) > 0:
            self._refresh_factor()
        self.log.truncate(state["epoch"])

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train ``epochs`` epochs (or what is left of them after ``--resume``); returns the best record."""
        cfg = self.cfg
        if cfg.resume and (self.run_dir / "last.pt").is_file():
            self.resume()
            self._say(f"resumed from {self.run_dir / 'last.pt'} at epoch {self.first_epoch}")
        else:
            if cfg.resume:
                self._say(f"--resume: {self.run_dir} holds no last.pt yet; starting the run from epoch 1")
            elif self.log.records or (self.run_dir / "last.pt").is_file():
                raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it, or "
                                      "--name (or --save-dir) to start another one beside it")
        if self.world.is_main:
            checkpoint.atomic_write_text(self.run_dir / "config.json", cfg.to_json())
        if self.first_epoch == 1 and cfg.eval_every:
            metrics = self.evaluate()  # the starting point: the (pretrained) model before training
            self._record({"epoch": 0, **metrics})
        for epoch in range(self.first_epoch, cfg.epochs + 1):
            record = {"epoch": epoch}
            if cfg.intra and epoch > cfg.start_epoch and (epoch - cfg.start_epoch - 1) % cfg.update_every_M_epoch == 0:
                t = time.perf_counter()
                self.refresh(epoch)
                record["refresh_s"] = time.perf_counter() - t
            record.update(self.train_epoch(epoch))
            if cfg.eval_every and (epoch % cfg.eval_every == 0 or epoch == cfg.epochs):
                t = time.perf_counter()
                record.update(self.evaluate())
                record["eval_s"] = time.perf_counter() - t
            self._record(record)
            if self.world.is_main:
                checkpoint.save(self.run_dir / "last.pt", self.state(epoch))
        if self.world.is_main:
            checkpoint.atomic_write_text(self.run_dir / "paper_comparison.md", report.paper_comparison(
                self.best, cfg.dataset, cfg.backbone, cfg.loss_name))
        return self.best

    def _record(self, record: dict) -> None:
        key = f"recall@{self.ks[0]}"
        if key in record and record[key] > self.best.get(key, -math.inf):
            self.best = {k: v for k, v in record.items()}
            if self.world.is_main:
                checkpoint.save(self.run_dir / "best.pt", {"epoch": record["epoch"], "config": dataclasses.asdict(self.cfg),
                                                           "model": self.model.state_dict(), "metrics": record})
        if not self.world.is_main:
            return
        self.log.append(record)
        report.plot(self.log.records, self.run_dir / "losses_and_recalls.png")
        self._say(summary_line(record, self.ks))

    def _say(self, text: str) -> None:
        if self.world.is_main:
            tqdm.write(text)


def summary_line(record: dict, ks) -> str:
    parts = [f"[epoch {record['epoch']}]"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}  {record['images_per_s']:.0f} img/s")
    parts += [f"Recall@{k} {100 * record[f'recall@{k}']:.2f}" for k in ks if f"recall@{k}" in record]
    if "map@r" in record:
        parts.append(f"MAP@R {100 * record['map@r']:.2f}  RP {100 * record['r_precision']:.2f}")
    return "  ".join(parts)


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training as configured; returns the best epoch's record."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        distributed.shutdown()


def evaluate_checkpoint(path, dataset: str | None = None, data: str | None = None, device: str = "auto",
                        loader: str | None = None) -> dict:
    """Metrics of the model stored in a ``best.pt`` / ``last.pt`` on its (or another) dataset's test split.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
    """
    state = checkpoint.load(path)
    cfg = dataclasses.replace(TrainConfig(**state["config"]), pretrained=False, device=device, resume=False)
    overrides = {k: v for k, v in (("dataset", dataset), ("data", data), ("loader", loader)) if v is not None}
    trainer = Trainer(dataclasses.replace(cfg, **overrides))
    try:
        trainer.model.load_state_dict(state["model"])
        return trainer.evaluate()
    finally:
        distributed.shutdown()
