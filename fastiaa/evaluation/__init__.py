"""Evaluation (docs/method.md §8): exact Recall@K, MAP@R and R-Precision
(:func:`retrieval_metrics`), and the embedding passes that feed them (:func:`embed`,
:func:`evaluate`), plain functions of a model, loaders and a device."""
from .embedding import embed, evaluate
from .metrics import FAISS_GPU_MAX_K, retrieval_metrics

__all__ = ["FAISS_GPU_MAX_K", "embed", "evaluate", "retrieval_metrics"]
