"""fastiaa: Intra-class Adaptive Augmentation with Neighbor Correction (Fu et al., IEEE TMM 2022),
fast: Triton kernels, DALI pipelines, a faiss evaluator, AMP and DDP."""

__version__ = "0.1.0"
