"""fastiaa.losses against per-anchor float64 transcriptions of docs/method.md §6."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastiaa.losses import ContrastiveLoss, MultiSimilarityLoss, TripletLoss

# ---------------------------------------------------------------- float64 references


def pairs(emb, labels, synthetic):
    """Per anchor: lists of (similarity tensor) positives and negatives, docs/method.md §6 rules."""
    b = emb.shape[0]
    cand = emb if synthetic is None else torch.cat([emb, synthetic.reshape(-1, emb.shape[1])])
    cand_labels = labels.repeat(cand.shape[0] // b)
    out = []
    for i in range(b):
        pos, neg = [], []
        for j in range(cand.shape[0]):
            s = emb[i] @ cand[j]
            if cand_labels[j] != labels[i]:
                neg.append(s)
            elif j % b != i:  # not the anchor itself nor a sample synthesised from it
                pos.append(s)
        out.append((pos, neg))
    return out


def ref_ms(emb, labels, synthetic, thresh=0.5, margin=0.1, a=2.0, bscale=40.0, eps=1e-5):
    total = emb.new_zeros(())
    for pos, neg in pairs(emb, labels, synthetic):
        pos = [s for s in pos if s < 1 - eps]
        if not pos or not neg:
            continue
        kept_neg = [s for s in neg if s + margin > min(pos)]
        kept_pos = [s for s in pos if s - margin < max(neg)]
        if not kept_neg or not kept_pos:
            continue
        total = total + torch.log(1 + sum(torch.exp(-a * (s - thresh)) for s in kept_pos)) / a
        total = total + torch.log(1 + sum(torch.exp(bscale * (s - thresh)) for s in kept_neg)) / bscale
    return total / emb.shape[0]


def ref_contrastive(emb, labels, synthetic, pm=0.8, nm=0.5):
    total = emb.new_zeros(())
    for pos, neg in pairs(emb, labels, synthetic):
        total = total + sum((pm - s for s in pos if s < pm), emb.new_zeros(()))
        total = total + sum((s - nm for s in neg if s > nm), emb.new_zeros(()))
    return total / emb.shape[0]


def ref_triplet(emb, labels, synthetic, margin=0.1):
    total = emb.new_zeros(())
    for pos, neg in pairs(emb, labels, synthetic):
        if neg:
            hardest = max(neg)
            total = total + sum((torch.relu(hardest - s + margin) for s in pos), emb.new_zeros(()))
    return total / emb.shape[0]


LOSSES = [(MultiSimilarityLoss(), ref_ms), (ContrastiveLoss(), ref_contrastive), (TripletLoss(), ref_triplet)]


def batch(seed, b=10, d=4, m=3, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    # labels: class 4 has a single image (no positive without synthetic samples)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 4])[:b]
    centres = torch.randn(5, d, generator=g)
    emb = F.normalize(centres[labels] + spread * torch.randn(b, d, generator=g), dim=1)
    syn = F.normalize(emb.unsqueeze(0) + 0.3 * torch.randn(m, b, d, generator=g), dim=2)
    return emb, labels, syn


@pytest.mark.parametrize("loss,ref", LOSSES, ids=["ms", "contrastive", "triplet"])
@pytest.mark.parametrize("with_synthetic", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_and_gradient_match_reference(loss, ref, with_synthetic, seed):
    emb, labels, syn = batch(seed)
    syn = syn if with_synthetic else None
    e = emb.clone().requires_grad_()
    s = syn.clone().requires_grad_() if syn is not None else None
    got = loss(e, labels, s)
    got.backward()
    e64 = emb.double().requires_grad_()
    s64 = syn.double().requires_grad_() if syn is not None else None
    want = ref(e64, labels, s64)
    want.backward()
    assert got.dtype == torch.float32 and got.dim() == 0
    assert float(want.detach()) > 0  # the batches do produce pairs
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(e.grad.double(), e64.grad, rtol=1e-4, atol=1e-6)
    if s is not None:
        torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


def test_ms_known_values_and_anchors_without_pairs():
    ms = MultiSimilarityLoss()
    # anchor 0 and 1 (class 0) at cos 0.9; anchor 2 (class 1) alone at cos 0 from both
    e = torch.tensor([[1.0, 0.0, 0.0], [0.9, math.sqrt(1 - 0.81), 0.0], [0.0, 0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    # negatives at 0 are not within the margin of the positive at 0.9: every anchor drops out
    assert float(ms(e, labels)) == 0.0
    # move the negative to cos 0.85 from anchor 0: s_neg + 0.1 > 0.9 and s_pos - 0.1 < 0.85
    e[2] = torch.tensor([0.85, 0.0, math.sqrt(1 - 0.85**2)])
    s01, s02, s12 = 0.9, 0.85, float(e[1] @ e[2])
    want = 0.5 * math.log(1 + math.exp(-2 * (s01 - 0.5))) + math.log(1 + math.exp(40 * (s02 - 0.5))) / 40
    if s12 + 0.1 > s01 and s01 - 0.1 < s12:
        want += 0.5 * math.log(1 + math.exp(-2 * (s01 - 0.5))) + math.log(1 + math.exp(40 * (s12 - 0.5))) / 40
    assert float(ms(e, labels)) == pytest.approx(want / 3, rel=1e-5)


def test_ms_drops_near_identical_positives():
    ms = MultiSimilarityLoss()
    e = F.normalize(torch.tensor([[1.0, 0.2], [1.0, 0.2], [0.9, 0.5]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    # the only positive pair has s = 1: dropped, so no anchor has a positive
    assert float(ms(e, labels)) == 0.0


def test_contrastive_known_value():
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1])
    # positives: (0,1) and (1,0) at 0.6 -> 0.2 each; negatives: (0,2) at 0.8 -> 0.3, (1,2) 0.96 -> 0.46,
    # and (2,0) 0.8 -> 0.3, (2,1) 0.96 -> 0.46
    want = (0.2 + 0.2 + 0.3 + 0.46 + 0.3 + 0.46) / 3
    assert float(ContrastiveLoss()(e, labels)) == pytest.approx(want, rel=1e-6)


def test_triplet_known_value_and_margin():
    e = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([0, 0, 1])
    # anchor 0: pos 0.6, hardest neg 0.8 -> 0.8 - 0.6 + m; anchor 1: pos 0.6, neg 0.96; anchor 2: no positive
    for m in (0.1, 0.3):
        want = ((0.8 - 0.6 + m) + (0.96 - 0.6 + m)) / 3
        assert float(TripletLoss(margin=m)(e, labels)) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("loss", [MultiSimilarityLoss(), ContrastiveLoss(), TripletLoss()])
def test_single_class_batch_is_zero_or_positive_only(loss):
    emb, _, syn = batch(3)
    labels = torch.zeros(10, dtype=torch.long)  # no negatives at all
    value = float(loss(emb, labels, syn))
    if isinstance(loss, ContrastiveLoss):
        assert value == pytest.approx(float(ref_contrastive(emb.double(), labels, syn.double())), rel=1e-5)
    else:
        assert value == 0.0


@pytest.mark.parametrize("loss", [MultiSimilarityLoss(), ContrastiveLoss(), TripletLoss()])
def test_loss_under_autocast_uses_float32_similarities(loss):
    emb, labels, syn = batch(4)
    plain = loss(emb, labels, syn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(emb, labels, syn)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, plain)


def test_loss_rejects_mismatched_synthetic():
    emb, labels, syn = batch(5)
    with pytest.raises(ValueError, match="synthetic"):
        MultiSimilarityLoss()(emb, labels, syn[:, :5])
    with pytest.raises(ValueError, match="labels"):
        ContrastiveLoss()(emb, labels[:5])


# ---------------------------------------------------------------- IAA with pytorch-metric-learning


def readme_example() -> str:
    """The code block of the README's section on using IAA in one's own training loop."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text[text.index("## Use IAA in your own training loop"):]
    return section[section.index("```python") + len("```python"):section.index("```\n", section.index("```python") + 9)]


def test_iaa_pairs_are_the_masks_of_the_losses():
    from fastiaa.losses import iaa_pairs, pair_masks

    labels = torch.tensor([0, 0, 1, 2, 1, 0])
    positive, negative = pair_masks(labels, 3)
    a1, p, a2, n = iaa_pairs(labels, 2)
    assert torch.equal(positive[a1, p], torch.ones_like(a1, dtype=torch.bool)) and len(a1) == int(positive.sum())
    assert torch.equal(negative[a2, n], torch.ones_like(a2, dtype=torch.bool)) and len(a2) == int(negative.sum())
    assert not bool(((p % 6) == a1).any())  # never an anchor's own copy
    assert len(a1) == 3 * (2 * 3 + 2 * 1)  # 3 blocks; class 0: 3 anchors x 2 others, class 1: 2 x 1


def test_readme_example_with_pytorch_metric_learning_matches_fastiaa():
    """The README's loop runs; on its last batch PML's MultiSimilarityLoss with the IAA pairs equals
    fastiaa's own MultiSimilarityLoss without mining (value and gradient)."""
    pytest.importorskip("pytorch_metric_learning")
    namespace = {}
    exec(compile(readme_example(), "README.md", "exec"), namespace)
    model, iaa, loss_fn, x, y, epoch = (namespace[k] for k in ("model", "iaa", "loss_fn", "x", "y", "epoch"))
    assert namespace["synthetic"] is not None and namespace["loss"].item() > 0  # it trained with IAA

    z = model(x)
    synthetic = F.normalize(iaa.synthesize(z, y, epoch), dim=-1)
    anchors = F.normalize(z, dim=-1)
    blocks = [anchors, *synthetic]
    from fastiaa.losses import iaa_pairs

    pml = loss_fn(anchors, y, iaa_pairs(y, len(blocks) - 1), torch.cat(blocks), y.repeat(len(blocks)))
    ours = MultiSimilarityLoss(margin=None)(anchors, y, synthetic)
    assert pml.item() > 0.1 and pml.item() == pytest.approx(ours.item(), rel=1e-5)
    g_pml, = torch.autograd.grad(pml, z, retain_graph=True)
    g_ours, = torch.autograd.grad(ours, z, retain_graph=True)
    torch.testing.assert_close(g_pml, g_ours, rtol=1e-4, atol=1e-7)
