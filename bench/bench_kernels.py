"""Kernel resources: registers, spill bytes and shared memory of every Triton kernel of fastiaa,
per kernel and configuration, compiled ahead of time for sm_80 and sm_90 with exactly what the
dispatch launches (fastiaa.kernels.aot: the real dispatch on CPU tensors, ``triton.compile`` for a
``GPUTarget``, ``ptxas -v``). No GPU is needed; with CUDA present (``--device cuda``) the same
configurations are also launched on the GPU and the driver's register count of each loaded kernel
is printed beside the ahead-of-time one.

Usage: python -m bench.bench_kernels [--dims 512] [--nums 1 2 3 4] [--capabilities 80 90] [--device cuda]
Prints one Markdown table: a row per configuration and kernel, M in the columns.
"""
from __future__ import annotations

import argparse

import torch

from fastiaa.kernels import aot


def driver_registers(grid: dict) -> dict[str, int]:
    """Run every configuration on the GPU and read the registers of the kernels the driver loaded,
    keyed by configuration (Triton's per-device kernel cache: a Triton-internal structure)."""
    out = {}
    device = torch.cuda.current_device()
    for launch in aot.dispatch_launches(**grid):
        args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in launch.args]
        launch.kernel[(1,)](*args, **launch.meta)
        torch.cuda.synchronize()
        cache = launch.kernel.device_caches[device][0]
        compiled = list(cache.values())[-1]
        compiled._init_handles()
        out[launch.config + " " + launch.kernel.__name__] = compiled.n_regs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[512])
    parser.add_argument("--nums", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--capabilities", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--workers", type=int, default=2, help="compiler processes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    grid = dict(dims=tuple(args.dims), nums=tuple(args.nums))
    results = aot.compile_grid(tuple(args.capabilities), workers=args.workers, **grid)
    gpu = driver_registers(grid) if args.device == "cuda" and torch.cuda.is_available() else {}

    # one row per configuration and kernel (M in the columns), one column group per target
    rows: dict[tuple[str, str], dict] = {}
    for launch, done in results:
        name, _, m = launch.config.partition(" M=")
        rows.setdefault((name, done.kernel), {})[(m or "-", done.capability)] = (done, launch.config)
    caps = tuple(args.capabilities)
    nums = ", ".join(map(str, args.nums))
    header = ("| configuration | kernel | " + " | ".join(f"sm_{c}: registers / spill bytes (M = {nums})" for c in caps)
              + f" | shared KiB (sm_{caps[-1]}) |" + (" registers on this GPU |" if gpu else ""))
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for (name, kernel), cells in rows.items():
        ms = sorted({m for m, _ in cells})
        groups = [", ".join(f"{cells[(m, c)][0].registers} / {cells[(m, c)][0].spill_bytes}" for m in ms) for c in caps]
        shared = max(cells[(m, caps[-1])][0].shared_bytes for m in ms) / 1024
        line = f"| {name} | `{kernel}` | " + " | ".join(groups) + f" | {shared:g} |"
        if gpu:
            line += " " + ", ".join(str(gpu.get(cells[(m, caps[-1])][1] + " " + kernel, "")) for m in ms) + " |"
        print(line)
    compiled = {(d.capability, d.key): d for _, d in results}
    spilling = sorted({f"sm_{d.capability} {d.kernel} {d.spill_bytes} B" for d in compiled.values() if d.spill_bytes})
    print(f"\n{len(compiled)} kernels compiled for {', '.join(f'sm_{c}' for c in caps)}; "
          f"{'none spills' if not spilling else 'spilling: ' + '; '.join(spilling)}.")


if __name__ == "__main__":
    main()
