"""The training loop: steps, statistics refreshes, evaluation, checkpoints and records.

One epoch (docs/method.md §2-7, following the official schedule):
  1. refresh the class statistics over the whole train set when ``IAA.refresh_due(epoch)``
     (after ``start_epoch``, every ``update_every_M_epoch`` epochs);
  2. train ``iter_per_epoch`` balanced batches, each augmented by ``IAA.synthesize`` with
     ``aug_num`` synthetic embeddings per original once synthesis is active (Eq. 17);
  3. step the learning-rate schedule, evaluate on the held-out classes, write records and
     checkpoints (atomically), so a killed run resumes from its last finished epoch.

This module is the only one that knows that order; every other room is called through its
public functions, and the covariance form is ``fastiaa.IAA``'s business.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastiaa import checkpoint, distributed, memory, registry, report, runtime
from fastiaa.config import TrainConfig
from fastiaa.data import BalancedBatchSampler, load_dataset
from fastiaa.data.convert import csv_text
from fastiaa.errors import NonFiniteError
from fastiaa.evaluation import embed, evaluate
from fastiaa.iaa import IAA
from fastiaa.models import create_model
from fastiaa.pipelines import build_train_loader

RETRIEVAL_QUERIES = 8  # queries drawn in retrievals.png
RUN_FILES = ("config.json", "metrics.jsonl", "losses_and_recalls.png", "retrievals.png", "split.csv", "last.pt",
             "best.pt", "paper_comparison.md")
# settings a resumed run may change: where and how fast it computes, not what (everything else must match)
RESUMABLE_CHANGES = ("device", "workers", "log_every", "work_memory_mib", "cache", "cache_gib",
                     "cache_dir", "resume", "eval_every")
RUN_MARKS = ("config.json", "metrics.jsonl", "last.pt")  # a folder with one of these holds a (started) run
_NO_STEP = 2**62  # "no non-finite step yet" (a min-reduction across ranks keeps the first one)


class Trainer:
    """Holds the pieces of one run and runs its epochs (see the module docstring)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.check()
        self.device = runtime.resolve_device(cfg.runtime.device)
        self.world = distributed.init(self.device.type)
        if self.world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", self.world.local_rank)
        self.amp = runtime.autocast_dtype(cfg.runtime.amp, self.device)
        checkpoint.seed_everything(cfg.runtime.seed)
        self.run_dir = cfg.run_dir()
        if not cfg.runtime.resume and any((self.run_dir / name).is_file() for name in RUN_MARKS):
            # checked by every rank before any rank writes (the DDP wrap below synchronises them)
            raise FileExistsError(f"{self.run_dir} already holds a run; pass --resume to continue it, or "
                                  "--name (or --save-dir) to start another one beside it")
        if self.world.is_main:
            checkpoint.check_writable(self.run_dir)

        self.dataset = load_dataset(cfg.data.dataset, cfg.data.data)
        self.ks = tuple(cfg.eval.recall) if cfg.eval.recall else self.dataset.recall_ks
        train, optim = self.dataset.train, cfg.optim
        if optim.batch % self.world.world_size:
            raise ValueError(f"--batch {optim.batch} must be a multiple of the number of processes "
                             f"({self.world.world_size})")
        iterations = min(len(train) // optim.batch, optim.iter_per_epoch)
        if iterations < 1:
            raise ValueError(f"--batch {optim.batch} is larger than the train set ({len(train)} images)")
        sampler = BalancedBatchSampler(train.labels, optim.batch, optim.num_image_per_class, iterations,
                                       cfg.runtime.seed)

        model = create_model(cfg.model.backbone, cfg.model.embedding_size, cfg.model.pretrained, cfg.model.weight_path)
        fmt = torch.channels_last if cfg.runtime.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=fmt)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed crop sizes: tune the convolutions once
        self.ddp = distributed.data_parallel(self.model, self.world)

        geometry = runtime.loader_geometry(cfg, self.dataset.resize, model.input_space, self.device)
        caches = runtime.build_caches(cfg, self.dataset, model.input_space, self.device, self.world)
        self.train_loader = build_train_loader(cfg.data.loader, train, sampler, seed=cfg.runtime.seed,
                                               shard=(self.world.rank, self.world.world_size),
                                               cache=caches.get("train"), **geometry)
        self.eval_loaders = runtime.eval_loaders(cfg, self.dataset, model.input_space, self.device, self.world,
                                                 splits=("train", "test", "query", "gallery"), caches=caches)

        self.optimizer = torch.optim.Adam(
            [{"params": list(model.backbone_parameters()), "lr": optim.lr},
             {"params": list(model.head_parameters()), "lr": optim.lr * optim.head_lr_mult}],
            weight_decay=optim.weight_decay, fused=self.device.type == "cuda" or None)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, list(optim.lr_decay_epochs),
                                                              optim.lr_decay_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        self.criterion = registry.load(registry.LOSSES, optim.loss_name)()
        # synthesis noise: a CPU generator per rank, seeded from the run seed (no device sync per step)
        self.iaa = IAA(train.num_classes, cfg.model.embedding_size, cfg.iaa, epochs=optim.epochs, device=self.device,
                       world=self.world, seed=cfg.runtime.seed * 1009 + self.world.rank, backend=cfg.runtime.kernels)
        self.log = report.MetricsLog(self.run_dir / "metrics.jsonl")
        self.first_epoch = 1
        self.best: dict = {}

    # -- pieces of an epoch ---------------------------------------------------------------
    def refresh(self, epoch: int) -> None:
        """Embed this rank's share of the train set and fold it into IAA's statistics (Eq. 7-16)."""
        z, y = embed(self.model, self.eval_loaders["train"], self.device, self.amp,
                     desc=f"refresh statistics (epoch {epoch})")
        self.iaa.fold(z, y)

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch. The loss sum and the finiteness check stay on the device and are read
        (one host synchronisation) every ``log_every`` steps and after the last step, so a NaN stops
        the run, named by its first epoch and step, before it reaches a refresh or a checkpoint.

        Raises:
            NonFiniteError: a loss or embedding was NaN / Inf (on any rank).
        """
        cfg = self.cfg
        self.ddp.train()
        self.train_loader.set_epoch(epoch)
        synth = self.iaa.active(epoch)
        steps, every = len(self.train_loader), max(1, cfg.runtime.log_every)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        first_bad = torch.full((), _NO_STEP, dtype=torch.int64, device=self.device)  # first non-finite step
        images, start = 0, time.perf_counter()
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{cfg.optim.epochs}", leave=False,
                   disable=not self.world.is_main, dynamic_ncols=True)
        for step, batch in enumerate(bar, 1):
            with torch.autocast(self.device.type, dtype=self.amp or torch.float32, enabled=self.amp is not None):
                z = self.ddp(batch.images).float()
            labels = batch.labels
            synthetic = self.iaa.synthesize(z, labels, epoch)
            z_all = distributed.all_gather_grad(z, self.world)
            labels_all = distributed.all_gather_equal(labels, self.world)  # every rank holds B / world images
            if synthetic is not None:  # gather along the batch dimension, keeping the [M, B, D] layout
                synthetic = distributed.all_gather_grad(synthetic.transpose(0, 1), self.world).transpose(0, 1)
                synthetic = F.normalize(synthetic, dim=-1)
            loss = self.criterion(F.normalize(z_all, dim=-1), labels_all, synthetic)
            finite = torch.isfinite(loss) & torch.isfinite(z).all()  # a NaN embedding can hide from the loss
            first_bad = torch.where(finite | (first_bad != _NO_STEP), first_bad, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            loss_sum += loss.detach()
            images += len(labels_all)
            if step % every == 0 or step == steps:
                mean_loss = self._read_loss(loss_sum, first_bad, epoch) / step
                bar.set_postfix(loss=f"{mean_loss:.4f}", synth="on" if synth else "off")
        seconds = time.perf_counter() - start
        self.scheduler.step()
        return {"loss": mean_loss, "images_per_s": images / seconds, "train_s": seconds,
                "lambda": self.iaa.lam(epoch) if synth else 0.0, "lr": self.optimizer.param_groups[0]["lr"]}

    def _read_loss(self, loss_sum: torch.Tensor, first_bad: torch.Tensor, epoch: int) -> float:
        """One host read of this rank's loss sum and of the first non-finite step of any rank."""
        first_bad = distributed.all_reduce(first_bad.clone(), self.world, "min")
        total, bad = torch.stack([loss_sum, first_bad.double()]).tolist()
        if bad != _NO_STEP:
            raise NonFiniteError(f"non-finite loss or embeddings at epoch {epoch}, step {int(bad)}; "
                                 "lower --lr or use --amp off")
        return total

    def evaluate(self) -> dict:
        """Recall@K / MAP@R / R-Precision on the held-out classes (docs/method.md §8), on every rank;
        the main rank draws ``retrievals.png``."""
        loaders = {k: v for k, v in self.eval_loaders.items() if k != "train"}
        return evaluate(self.model, loaders, self.device, self.amp, self.ks, self.cfg.eval.map, self.world,
                        on_embeddings=self.draw_retrievals)

    def draw_retrievals(self, query, query_labels, reference, reference_labels) -> None:
        """``retrievals.png``: the same RETRIEVAL_QUERIES queries at every evaluation (a fixed draw),
        each with its 5 nearest references by cosine similarity (itself excluded when the query set
        is the reference set), found on the device, where the embeddings are."""
        single = reference is None
        queries = self.dataset.test if single else self.dataset.query
        references = queries if single else self.dataset.gallery
        rows = np.sort(np.random.default_rng(0).choice(len(queries), min(RETRIEVAL_QUERIES, len(queries)),
                                                       replace=False))
        picked = torch.from_numpy(rows).to(query.device)
        similarity = F.normalize(query[picked], dim=1) @ F.normalize(query if single else reference, dim=1).T
        if single:
            similarity[torch.arange(len(rows)), picked] = -torch.inf
        top, ids = similarity.topk(min(5, similarity.shape[1] - int(single)), dim=1)
        query_names, reference_names = _class_names(queries), _class_names(references)
        retrievals = [report.Retrieval(queries.paths[q], query_names[q], tuple(
            report.Hit(references.paths[i], reference_names[i], s) for s, i in zip(sims, found)))
            for q, sims, found in zip(rows.tolist(), top.tolist(), ids.tolist())]
        report.plot_retrievals(retrievals, self.run_dir / "retrievals.png")

    # -- checkpoints ------------------------------------------------------------------------
    def state(self, epoch: int) -> dict:
        """The checkpoint of this epoch (a collective call under DDP: IAA gathers every rank's generator)."""
        return {"epoch": epoch, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "iaa": self.iaa.state_dict(), "rng": checkpoint.rng_state(),
                "best": self.best, "world_size": self.world.world_size}

    def resume(self) -> None:
        """Continue from ``last.pt``: exactly the run that was interrupted, or refused.

        Raises:
            ValueError: a setting differs from the checkpoint's other than where and how fast the run
                computes (``RESUMABLE_CHANGES``); the message lists every change.
        """
        state = checkpoint.load(self.run_dir / "last.pt", map_location=self.device)
        changed = self.cfg.differences(checkpoint.config_of(state),
                                       [key for key in self.cfg.flat() if key not in RESUMABLE_CHANGES])
        if changed:
            raise ValueError(f"--resume: {self.run_dir / 'last.pt'} was trained with other settings "
                             f"({'; '.join(changed)}); resume with the run's own settings or start a new --name")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.iaa.load_state_dict(state["iaa"])
        if state["world_size"] == self.world.world_size:
            checkpoint.set_rng_state(state["rng"])
        self.best = state["best"]
        self.first_epoch = state["epoch"] + 1
        self.log.truncate(state["epoch"])

    # -- the run ----------------------------------------------------------------------------
    def run(self) -> dict:
        """Train ``epochs`` epochs (or what is left of them after ``--resume``); returns the best record."""
        with memory.work_memory(self.cfg.runtime.work_memory_mib):
            return self._run()

    def _run(self) -> dict:
        cfg = self.cfg
        if self.world.is_main:
            for path in checkpoint.remove_partial_writes(self.run_dir, RUN_FILES):
                self._say(f"removed {path}, left by an interrupted write")
        if cfg.runtime.resume and (self.run_dir / "last.pt").is_file():
            self.resume()
            self._say(f"resumed from {self.run_dir / 'last.pt'} at epoch {self.first_epoch}")
        elif cfg.runtime.resume:
            self._say(f"--resume: {self.run_dir} holds no last.pt yet; starting the run from epoch 1")
            if self.world.is_main:
                self.log.truncate(-1)  # records of a run killed before its first checkpoint: done again
        if self.world.is_main:
            checkpoint.atomic_write_text(self.run_dir / "config.json", cfg.to_json())
            if self.dataset.split_seed is not None:  # a split fastiaa drew: the run says which images it held out
                checkpoint.atomic_write_text(self.run_dir / "split.csv", csv_text(self.dataset))
        if self.first_epoch == 1 and cfg.eval.eval_every:
            metrics = self.evaluate()  # the starting point: the (pretrained) model before training
            self._record({"epoch": 0, **metrics})
        for epoch in range(self.first_epoch, cfg.optim.epochs + 1):
            record = {"epoch": epoch}
            if self.iaa.refresh_due(epoch):
                t = time.perf_counter()
                self.refresh(epoch)
                record["refresh_s"] = time.perf_counter() - t
            record.update(self.train_epoch(epoch))
            every = cfg.eval.eval_every
            if every and (epoch % every == 0 or epoch == cfg.optim.epochs):
                t = time.perf_counter()
                record.update(self.evaluate())
                record["eval_s"] = time.perf_counter() - t
            self._check_weights(epoch)
            self._record(record)
            state = self.state(epoch)
            if self.world.is_main:
                checkpoint.save(self.run_dir / "last.pt", state)
        if self.world.is_main:
            checkpoint.atomic_write_text(self.run_dir / "paper_comparison.md", report.paper_comparison(
                self.best, cfg.data.dataset, cfg.model.backbone, cfg.optim.loss_name))
        return self.best

    def _check_weights(self, epoch: int) -> None:
        """Refuse to record or checkpoint a model whose weights or optimizer state went non-finite
        (the losses of the epoch were finite: an update made them so, e.g. a learning rate too large).

        Raises:
            NonFiniteError: naming the epoch; the previous epoch's ``last.pt`` stays the last one.
        """
        tensors = [p for p in self.model.parameters()] + [v for state in self.optimizer.state.values()
                                                          for v in state.values() if torch.is_tensor(v)]
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        if not bool(distributed.all_reduce(finite.to(self.device, torch.int32), self.world, "min")):
            raise NonFiniteError(f"the model's weights became non-finite during epoch {epoch} (its losses were "
                                 "finite up to its last step); lower --lr / --head-lr-mult, or use --amp off. "
                                 f"{'last.pt of epoch ' + str(epoch - 1) + ' is' if epoch > 1 else 'nothing was'} kept")

    def _record(self, record: dict) -> None:
        """Append ``record`` to the run's records and plot (small files first), then keep ``best.pt``."""
        if self.world.is_main:
            self.log.append(record)
            report.plot(self.log.records, self.run_dir / "losses_and_recalls.png")
            self._say(summary_line(record, self.ks))
        key = f"recall@{self.ks[0]}"
        if record["epoch"] > 0 and key in record and record[key] > self.best.get(key, -math.inf):  # trained epochs
            self.best = dict(record)
            if self.world.is_main:
                checkpoint.save(self.run_dir / "best.pt", {"epoch": record["epoch"], "config": self.cfg.to_dict(),
                                                           "model": self.model.state_dict(), "metrics": record})

    def _say(self, text: str) -> None:
        if self.world.is_main:
            tqdm.write(text)


def _class_names(images) -> tuple[str, ...]:
    """The class id of every image of an ImageSet."""
    return tuple(images.class_ids[k] for k in images.labels)


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
                        loader: str | None = None, cache: str = "off", cache_dir: str | None = None) -> dict:
    """Metrics of the model stored in a ``best.pt`` / ``last.pt`` on its (or another) dataset's test
    split: builds the model and the eval loaders only. With ``cache_dir`` the test crops come from
    (or go to) a persistent cache there, which a training run with the same ``--cache-dir`` wrote.

    Raises:
        FileNotFoundError: no checkpoint at ``path``; ValueError: not a fastiaa checkpoint.
    """
    state = checkpoint.load(path)
    overrides = {k: v for k, v in (("dataset", dataset), ("data", data), ("loader", loader)) if v is not None}
    if cache_dir is not None and cache == "off":
        cache = "ram"
    cfg = checkpoint.config_of(state).replace(pretrained=False, device=device, cache=cache, cache_dir=cache_dir,
                                              **overrides)
    dev = runtime.resolve_device(cfg.runtime.device)
    model = runtime.checkpoint_model(state, cfg, dev)
    ds = load_dataset(cfg.data.dataset, cfg.data.data)
    world = distributed.World()
    caches = runtime.build_caches(cfg, ds, model.input_space, dev, world, splits=("test", "query", "gallery"))
    loaders = runtime.eval_loaders(cfg, ds, model.input_space, dev, world, caches=caches)
    ks = tuple(cfg.eval.recall) if cfg.eval.recall else ds.recall_ks
    with memory.work_memory(cfg.runtime.work_memory_mib):
        return evaluate(model, loaders, dev, runtime.autocast_dtype(cfg.runtime.amp, dev), ks, cfg.eval.map)
