"""bench/baselines.py computes what fastiaa computes: the authors' per-anchor Multi-Similarity
loop gives fastiaa's loss and gradients on the same batch, and their retrieval loop fastiaa's metrics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from bench.baselines import authors_retrieval, ms_loss_loop, synthesize_loop
from fastiaa.evaluation import retrieval_metrics
from fastiaa.losses import MultiSimilarityLoss


def batch(seed: int, b: int = 24, d: int = 16, m: int = 3, classes: int = 8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(b // classes)
    centres = torch.randn(classes, d, generator=g)
    z = (centres[labels] + 0.8 * torch.randn(b, d, generator=g)).requires_grad_()
    cov = 0.3 * torch.rand(classes, d, generator=g)
    return z, labels, cov, m


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("with_synthetic", [False, True])
def test_authors_ms_loop_equals_fastiaa_loss_and_gradient(seed, with_synthetic):
    z, labels, cov, m = batch(seed)
    torch.manual_seed(seed)
    synthetic = synthesize_loop(z, labels, cov, 0.6, m) if with_synthetic else None
    losses, grads = [], []
    for loss_fn in (ms_loss_loop, MultiSimilarityLoss()):
        z.grad = None
        syn = None if synthetic is None else F.normalize(synthetic, dim=-1)
        loss = loss_fn(F.normalize(z, dim=-1), labels, syn)
        loss.backward(retain_graph=True)
        losses.append(loss.item())
        grads.append(z.grad.clone())
    assert losses[0] > 0.1
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_anchor_without_positive_contributes_nothing():
    z = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])   # unit vectors: s01 = 0.6, s02 = 0.8, s12 = 0.96
    labels = torch.tensor([0, 0, 1])                          # anchor 2 has no positive
    # anchors 0 and 1: positive s = 0.6, negative 0.8 / 0.96, all kept by the mining; float64 by hand
    expected = sum(math.log1p(math.exp(-2.0 * (0.6 - 0.5))) / 2 + math.log1p(math.exp(40.0 * (neg - 0.5))) / 40
                   for neg in (0.8, 0.96)) / 3
    assert ms_loss_loop(z, labels).item() == pytest.approx(expected, rel=1e-5)
    assert MultiSimilarityLoss()(z, labels).item() == pytest.approx(expected, rel=1e-5)


def test_synthesis_loop_draws_from_the_class_covariance():
    torch.manual_seed(0)
    z = torch.zeros(2, 3)
    cov = torch.tensor([[4.0, 1.0, 0.0], [0.25, 9.0, 1.0]])
    out = synthesize_loop(z.repeat(4000, 1), torch.tensor([0, 1]).repeat(4000), cov, 0.5, 2)
    assert out.shape == (2, 8000, 3)
    var = out.reshape(2, 4000, 2, 3).var(dim=(0, 1))            # per class and dimension
    torch.testing.assert_close(var, 0.5 * cov, rtol=0.06, atol=0.01)


def test_authors_retrieval_equals_fastiaa_metrics():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(60).repeat_interleave(torch.randint(2, 7, (60,), generator=g))
    z = torch.randn(60, 8, generator=g)[labels] + 0.9 * torch.randn(len(labels), 8, generator=g)
    ours = retrieval_metrics(z, labels, ks=(1, 2, 4, 8), device="cpu")
    theirs = authors_retrieval(z, labels, (1, 2, 4, 8))
    assert 0.2 < theirs["recall@1"] < 0.95
    for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision"):
        assert theirs[key] == pytest.approx(ours[key], abs=1e-6), key
