"""torch.distributed helpers for runs launched by ``torchrun`` (DistributedDataParallel).

A process started without torchrun's environment (RANK / WORLD_SIZE) is a world of one and
every helper here is then the identity, so the trainer has a single code path.
"""
from __future__ import annotations

import datetime
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init(device_type: str, timeout_s: float = 600.0) -> World:
    """Join the process group that ``torchrun`` describes in the environment.

    NCCL for CUDA, gloo for the CPU. Returns ``World()`` when not launched by torchrun.
    """
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World()
    world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return world


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(n: int, world: World) -> slice:
    """Contiguous slice of ``range(n)`` owned by ``world.rank`` (sizes differ by at most 1)."""
    per, extra = divmod(n, world.world_size)
    start = world.rank * per + min(world.rank, extra)
    return slice(start, start + per + (world.rank < extra))


def data_parallel(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """``model`` in DistributedDataParallel (itself in a world of one), without the buffer broadcast
    of every forward: every BatchNorm is frozen (eval mode), so its buffers never change. The
    parameter is ``forward_sync_buffers`` from torch 2.13 on, ``broadcast_buffers`` before."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    new = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return DistributedDataParallel(model, **{"forward_sync_buffers" if new else "broadcast_buffers": False})


def all_gather_grad(x: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's ``x`` (same shape on all ranks) along dim 0, keeping gradients.

    The backward pass sums each rank's gradient back to the owner, so a loss computed
    identically on every rank from the gathered tensor, with DDP's gradient averaging,
    gives exactly the single-process gradient of the global batch.
    """
    if not world.distributed:
        return x
    return _GatherWithGrad.apply(x, world)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather_grad's autograd: gather forward; backward, the sum over ranks of the gradient
    of the gathered tensor, this rank's slice of it (all_reduce: gloo has no reduce_scatter)."""

    @staticmethod
    def forward(ctx, x, world):
        ctx.world = world
        return all_gather_equal(x, world)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(ctx.world.world_size)[ctx.world.rank], None


def all_gather_equal(x: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's ``x`` (the same shape on all ranks, e.g. a rank's share of a
    batch) in rank order, no gradient and no size exchange (no host synchronisation)."""
    if not world.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(world.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_varsize(x: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate every rank's ``x`` (dim 0 may differ by rank) in rank order, no gradient
    (one host synchronisation to read the sizes)."""
    if not world.distributed:
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(world.world_size)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = torch.cat(sizes).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def barrier(world: World) -> None:
    """Wait for every rank (nothing in one process)."""
    if world.distributed:
        dist.barrier()


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce(x: torch.Tensor, world: World, op: str = "sum") -> torch.Tensor:
    """In-place reduction (``"sum"``, ``"max"`` or ``"min"``) over ranks; returns ``x``."""
    if world.distributed:
        dist.all_reduce(x, op=_OPS[op])
    return x


def all_gather_object(obj, world: World) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not world.distributed:
        return [obj]
    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, world: World):
    """Rank 0's ``obj`` on every rank."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
