"""Every Triton kernel compiled ahead of time for real GPUs (sm_80, sm_90) with exactly what the
dispatch launches, over dtypes, D, M and the three forms, without a GPU (fastiaa.kernels.aot):
a compile error fails here, not on the first GPU. At the shapes that matter (D = 512, M <= 4)
no kernel may spill registers on sm_90."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the compiler", allow_module_level=True)

from fastiaa.kernels import _dispatch, aot, moments, sampling  # noqa: E402


def _shape_that_matters(launch, capability):
    """sm_90 at D = 512 (M <= 4 throughout the grid)."""
    return capability == 90 and "D=512" in launch.config.split()


@pytest.fixture(scope="module")
def compiled():
    return aot.compile_grid((80, 90), usage=_shape_that_matters, workers=2)


def test_every_dispatched_kernel_compiles_for_sm80_and_sm90(compiled):
    kernels = {done.kernel for _, done in compiled}
    assert kernels == {"_mean_diag_kernel", "_full_kernel", "_synthesize_kernel"}
    configs = {launch.config for launch, _ in compiled}
    for form in aot.FORMS:
        for dtype in aot.DTYPES:
            assert any(c.startswith(f"synthesize {form} {dtype} D=2048 M=4") for c in configs)
    assert {done.capability for _, done in compiled} == {80, 90}
    assert all(done.shared_bytes <= 99 * 1024 for _, done in compiled)  # fits one SM of sm_80 and sm_90


def test_no_spills_at_the_shapes_that_matter(compiled):
    checked = [(launch.config, done) for launch, done in compiled if _shape_that_matters(launch, done.capability)]
    forms = {c.split(" D=")[0].split(" ")[1] for c, _ in checked}
    assert forms >= {"diag", "full", "lowrank"} and len(checked) >= 20
    spilling = [(c, d.registers, d.spill_bytes) for c, d in checked if d.spill_bytes]
    assert not spilling, spilling
    assert all(d.registers <= 255 for _, d in checked)


def test_seeds_are_never_specialised():
    """Seeds 1, small, 64-bit and divisible by 16 give one compiled kernel (one compile per run)."""
    z, labels, std = torch.zeros(4, 512), torch.tensor([0, 1, 0, 1]), torch.ones(2, 512)
    keys = set()
    for seed in (1, 5, 16, 2**31 + 7, 2**40 * 16, 2**62 - 1):
        with _dispatch.recording() as launches:
            sampling._launch(z, labels, std, 0.5, 3, seed, sampling._DIAG, False)
        keys.add(aot.key_of(aot.Launch("seed", *launches[0][:1], launches[0][2], launches[0][3]), 90))
    assert len(keys) == 1, keys


def test_the_dispatch_launches_every_kernel_of_the_package():
    jitted = {name for module in (moments, sampling) for name, obj in vars(module).items()
              if type(obj).__name__ == "JITFunction" and name.endswith("_kernel")}
    launched = {launch.kernel.__name__ for launch in aot.dispatch_launches(dims=(512,), nums=(2,))}
    assert jitted == launched == {"_mean_diag_kernel", "_full_kernel", "_synthesize_kernel"}
