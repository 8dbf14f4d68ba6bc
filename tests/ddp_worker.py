"""One tiny run's refresh, evaluation and training step, saved for tests/test_distributed.py.

Run as a single process or under ``torchrun --nproc-per-node 2`` (gloo on the CPU); the test
compares what the two wrote. ``fail`` makes rank 1 raise while rank 0 waits in a collective.
"""
import sys

import torch

from fastiaa.config import TrainConfig
from fastiaa.train import Trainer


def main(root: str, out: str, mode: str) -> None:
    # warmup_epoch=1: epoch 1 trains without synthesis (per-rank noise differs by design)
    cfg = TrainConfig.build(dataset="kanji", data=root, backbone="efficientnet_lite0", image_size=48, resize_size=56,
                            batch=24, eval_batch=20, num_image_per_class=3, iter_per_epoch=1, epochs=2,
                            embedding_size=32, workers=0, start_epoch=0, warmup_epoch=1, update_every_M_epoch=1,
                            correction="on", num_neighbor=5, save_dir=out, name="ddp", seed=5, device="cpu", amp="off")
    trainer = Trainer(cfg)
    if mode == "fail":
        if trainer.world.rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        torch.distributed.barrier()  # never passes: the launcher must end this rank
    metrics = trainer.evaluate()
    trainer.refresh(1)
    assert not trainer.iaa.active(1)
    loss = trainer.train_epoch(1)["loss"]
    if trainer.world.is_main:
        torch.save({"metrics": metrics, "statistics": trainer.iaa.statistics.state_dict(), "loss": loss,
                    "model": trainer.model.state_dict(),
                    "grad": {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}},
                   f"{out}/{mode}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
