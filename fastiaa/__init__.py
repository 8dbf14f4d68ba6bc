"""fastiaa: Intra-class Adaptive Augmentation with Neighbor Correction (Fu et al., IEEE TMM 2022),
fast: Triton kernels, DALI pipelines, a faiss evaluator, AMP and DDP.

``from fastiaa import IAA`` gives the method as one object (``fastiaa.iaa.IAA``); it is imported on
first use, so that ``import fastiaa`` (and the command line) does not import torch.
"""

__version__ = "0.1.0"
__all__ = ["IAA"]


def __getattr__(name: str):
    if name == "IAA":
        from fastiaa.iaa import IAA

        return IAA
    raise AttributeError(f"module 'fastiaa' has no attribute {name!r}")
