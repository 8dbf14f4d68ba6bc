"""The authors' algorithms, re-implemented from docs/method.md (§2-8) as the baselines of the
benchmarks: the same method, computed the way the official code is structured. Nothing here is
used by fastiaa; bench/ scripts time these against fastiaa in the same run.

  images      AuthorsTransform + AuthorsImages: PIL + a torchvision transform per sample
              (Resize, RandomResizedCrop, flip, ToTensor, Normalize; BN-Inception: BGR, x255,
              mean subtraction) in DataLoader workers, default collate: float32, channels-first
              (docs/method.md §2)
  estimator   AuthorsDense, the official small-dataset estimator: one-hot expansion of the
              embeddings to [N, C, D], sums over N, parallel-variance fold (diagonal);
              AuthorsLoops, the official large-dataset path: a Python loop over classes for the
              statistics fold and another for the neighbour correction (docs/method.md §3-4)
  synthesis   synthesize_loop: a Python loop over the M samples, each z + sqrt(λ) Σ^(1/2) ε
              (docs/method.md §5; the paper's Σ^(1/2) for every sample, so the result matches
              fastiaa's default)
  loss        ms_loss_loop: Multi-Similarity written as the official code writes it, a Python
              loop over anchors, boolean indexing of one similarity row at a time (docs/method.md §6)
  evaluation  authors_retrieval: chunked similarity + top-k on the device, then a Python loop per
              query for MAP@R and R-Precision (docs/method.md §8)
  training    AuthorsTrainer: the loop of bench_train over fastiaa's data and model definitions,
              float32, channels-first, no autocast, torch.optim.Adam with its default
              implementation; the estimator (AuthorsLoops) is refreshed over the train set with
              the train transform, as the official code does

Both estimators follow fastiaa's (paper) conventions so that results can be compared: min-max
over the candidate classes (docs/method.md §4, official-code difference (c) off).
tests/test_bench_train.py checks that the loop-based loss, synthesis and retrieval compute what
fastiaa computes.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

# the official settings (docs/method.md §3-4): fold momentum, K neighbours, β, γ, τ
MOMENTUM, NEIGHBORS, BETA, GAMMA, TAU = 0.2, 25, 0.1, 0.1, 40


# ------------------------------------------------------------------ images

class AuthorsTransform:
    """Per-sample torchvision transform of the official code for one backbone input space.

    train: Resize((s, s)) -> RandomResizedCrop(crop, scale (0.16, 1), ratio (0.75, 1.33)) ->
    RandomHorizontalFlip; eval: Resize((s, s)) -> CenterCrop(crop). Then ToTensor (RGB [0, 1]),
    for BN-Inception BGR order and x255, then Normalize(mean, std) of ``normalization``
    (a fastiaa.pipelines.Normalization). Output: float32 [3, crop, crop], channels-first.

    bench_train builds it per backbone; bench_pipeline uses the fixed train transform
    ``AuthorsTransform(NORMALIZATIONS["imagenet"], True, 256, 224)`` (docs/method.md §2).
    """

    def __init__(self, normalization, train: bool, resize_size: int, crop_size: int):
        import torchvision.transforms as T

        geometry = [T.Resize((resize_size, resize_size))]
        if train:
            geometry += [T.RandomResizedCrop(crop_size, scale=(0.16, 1.0), ratio=(0.75, 1.33)),
                         T.RandomHorizontalFlip()]
        else:
            geometry += [T.CenterCrop(crop_size)]
        self.geometry = T.Compose(geometry)
        self.to_tensor = T.ToTensor()
        self.normalize = T.Normalize(normalization.mean, normalization.std)
        self.bgr, self.scale = normalization.bgr, normalization.scale

    def __call__(self, image):
        x = self.to_tensor(self.geometry(image))
        if self.bgr:
            x = x.flip(0)
        if self.scale != 1.0:
            x = x * self.scale
        return self.normalize(x)


class AuthorsImages(torch.utils.data.Dataset):
    """The authors' style of dataset over a fastiaa.data.ImageSet: item i -> (float32
    [3, crop, crop] image, int label), PIL open + convert("RGB") + ``transform`` (an
    ``AuthorsTransform``), for a DataLoader with the default collate."""

    def __init__(self, images, transform: AuthorsTransform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        with Image.open(self.images.paths[i]) as im:
            return self.transform(im.convert("RGB")), int(self.images.labels[i])


# ------------------------------------------------------------------ estimator

class AuthorsDense:
    """Official small-dataset estimator (diagonal, Eq. 7-8, docs/method.md §3): one-hot
    expansion of the embeddings to [N, C, D], sums over N, parallel-variance fold.
    ``ave`` [C, D] means, ``cov`` [C, D] diagonal covariances, ``amount`` [C] samples folded."""

    def __init__(self, num_classes: int, dim: int):
        self.ave = torch.zeros(num_classes, dim)
        self.cov = torch.zeros(num_classes, dim)
        self.amount = torch.zeros(num_classes)

    def update(self, features, labels):
        n, d = features.shape
        c = self.ave.shape[0]
        onehot = torch.zeros(n, c).scatter_(1, labels.view(-1, 1), 1)
        onehot_ncd = onehot.view(n, c, 1).expand(n, c, d)
        by_class = features.view(n, 1, d).expand(n, c, d).mul(onehot_ncd)
        amount = onehot_ncd.sum(0)
        amount[amount == 0] = 1
        ave = by_class.sum(0) / amount
        var = (by_class - ave.expand(n, c, d).mul(onehot_ncd)).pow(2).sum(0) / amount
        n_new = onehot.sum(0).view(c, 1).expand(c, d)
        w = n_new / (n_new + self.amount.view(c, 1).expand(c, d))
        w[w != w] = 0
        w = torch.where(n_new > 0, w.clamp_min(1 - MOMENTUM), w)
        extra = w * (1 - w) * (self.ave - ave).pow(2)
        self.cov = self.cov * (1 - w) + var * w + extra
        self.ave = self.ave * (1 - w) + ave * w
        self.amount += onehot.sum(0)


class AuthorsLoops:
    """Official large-dataset path (diagonal covariance): a Python loop over classes for the
    statistics fold (Eq. 7-8, docs/method.md §3) and another for the neighbour correction
    (Eq. 9-16, docs/method.md §4). ``ave``, ``cov``, ``amount`` as AuthorsDense; ``size`` [C]
    the class sizes of the latest refresh (n_k)."""

    def __init__(self, num_classes: int, dim: int, device=None):
        self.ave = torch.zeros(num_classes, dim, device=device)
        self.cov = torch.zeros(num_classes, dim, device=device)
        self.amount = torch.zeros(num_classes, device=device)
        self.size = torch.zeros(num_classes, dtype=torch.int64, device=device)

    def update(self, features, labels):
        for k in range(self.ave.shape[0]):
            f = features[labels == k]
            n = f.shape[0]
            if n == 0:
                continue
            mu = f.mean(0)
            var = (f - mu).pow(2).mean(0)
            w = max(n / (n + float(self.amount[k])), 1 - MOMENTUM)
            self.cov[k] = (1 - w) * self.cov[k] + w * var + w * (1 - w) * (self.ave[k] - mu).pow(2)
            self.ave[k] = (1 - w) * self.ave[k] + w * mu
            self.amount[k] += n
            self.size[k] = n

    def distances(self):
        mean_sq = self.ave**2
        return torch.cdist(mean_sq, mean_sq), torch.cdist(self.cov, self.cov)

    def corrected(self, row_distances: bool = False, classes=None):
        """Corrected covariances [C, D] (classes not corrected keep theirs). row_distances: each
        class's distance rows computed inside the loop, as the official code does, instead of two
        cdist matrices up front; classes: the classes to correct (default all). Sets
        ``loop_seconds`` and ``loop_cpu_seconds``, the wall and CPU time of the per-class loop alone."""
        size = self.size.float()
        cand = self.size > 1
        glob = (size[cand, None] * self.cov[cand]).sum(0) / size[cand].sum()
        mean_sq = self.ave**2
        if not row_distances:
            dist_m, dist_cv = self.distances()
        out = self.cov.clone()
        start, cpu_start = time.perf_counter(), time.process_time()
        for k in range(self.ave.shape[0]) if classes is None else classes:
            n = int(self.size[k])
            if not 1 <= n < TAU:
                continue
            alpha = 1 / (1 + math.log(1 + BETA * (n - 1)))
            if row_distances:
                row_m = (mean_sq - mean_sq[k]).norm(dim=1)
                row_cv = (self.cov - self.cov[k]).norm(dim=1)
            else:
                row_m, row_cv = dist_m[k], dist_cv[k]
            mask = cand.clone()
            mask[k] = False
            idx = row_m.masked_fill(~mask, 1e12).topk(NEIGHBORS, largest=False).indices
            m_c, cv_c = row_m[mask], row_cv[mask]
            dm = (row_m[idx] - m_c.min()) / (m_c.max() - m_c.min())
            dcv = (row_cv[idx] - cv_c.min()) / (cv_c.max() - cv_c.min())
            w = size[idx] * torch.exp(-dm**2 / 2 - dcv**2 / 2)
            neighbor = (w[:, None] * self.cov[idx]).sum(0) / w.sum()
            out[k] = (1 - alpha) * self.cov[k] + alpha * ((1 - GAMMA) * neighbor + GAMMA * glob)
        self.loop_seconds = time.perf_counter() - start
        self.loop_cpu_seconds = time.process_time() - cpu_start
        return out


# ------------------------------------------------------------------ synthesis, loss, evaluation

def synthesize_loop(z: torch.Tensor, labels: torch.Tensor, covariance: torch.Tensor, lam: float,
                    num: int) -> torch.Tensor:
    """[num, B, D] synthetic embeddings, one loop iteration per sample (docs/method.md §5, Eq. 17).

    z: [B, D] float32 originals (gradients flow through them); labels: [B] int64;
    covariance: [C, D] diagonal covariances of the classes.
    """
    std = covariance[labels].clamp_min(0).sqrt()
    samples = []
    for _ in range(num):
        samples.append(z + math.sqrt(lam) * std * torch.randn_like(z))
    return torch.stack(samples)


def ms_loss_loop(embeddings: torch.Tensor, labels: torch.Tensor, synthetic: torch.Tensor | None = None,
                 threshold: float = 0.5, margin: float = 0.1, scale_pos: float = 2.0, scale_neg: float = 40.0,
                 epsilon: float = 1e-5) -> torch.Tensor:
    """Multi-Similarity loss with IAA candidates, one anchor at a time (docs/method.md §6).

    embeddings: [B, D] L2-normalised originals (the anchors); labels [B];
    synthetic: None or [M, B, D] L2-normalised, block m row b drawn from original b.
    Candidates are the originals followed by the M blocks; an anchor's positives are the
    same-label candidates other than its own position in every block, with s < 1 - epsilon;
    anchors with no positive or negative before or after mining contribute 0; the sum is
    divided by B. Returns a float32 scalar.
    """
    b = embeddings.shape[0]
    candidates = embeddings if synthetic is None else torch.cat([embeddings, synthetic.reshape(-1, embeddings.shape[1])])
    blocks = candidates.shape[0] // b
    candidate_labels = labels.repeat(blocks)
    position = torch.arange(candidates.shape[0], device=labels.device) % b
    sim = embeddings @ candidates.T
    losses = []
    for i in range(b):
        row = sim[i]
        same = candidate_labels == labels[i]
        pos_pair = row[same & (position != i)]
        pos_pair = pos_pair[pos_pair < 1 - epsilon]
        neg_pair = row[~same]
        if len(pos_pair) < 1 or len(neg_pair) < 1:
            continue
        neg_kept = neg_pair[neg_pair + margin > pos_pair.min()]
        pos_kept = pos_pair[pos_pair - margin < neg_pair.max()]
        if len(neg_kept) < 1 or len(pos_kept) < 1:
            continue
        pos_loss = torch.log(1 + torch.sum(torch.exp(-scale_pos * (pos_kept - threshold)))) / scale_pos
        neg_loss = torch.log(1 + torch.sum(torch.exp(scale_neg * (neg_kept - threshold)))) / scale_neg
        losses.append(pos_loss + neg_loss)
    if not losses:
        return sim.sum() * 0.0
    return sum(losses) / b


def authors_retrieval(z: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> dict:
    """Recall@K, MAP@R and R-Precision the official way (docs/method.md §8): chunks of 10,000 queries,
    the query itself pushed first and dropped, top-k on z's device, then Python loops per query.

    z: [N, D] embeddings (normalised here); labels: [N] int64 (same device or CPU).
    Fractions in [0, 1]; every class needs at least two images.
    """
    z = F.normalize(z.float(), dim=1)
    y = labels.to(z.device)
    count = torch.bincount(y)
    k = min(1 + max(int(count.max()), max(ks)), len(z))
    neighbours = []
    for start in range(0, len(z), 10000):
        sim = z[start:start + 10000] @ z.T
        rows = torch.arange(len(sim), device=z.device)
        sim[rows, rows + start] = 1e5
        neighbours.append(sim.topk(k, dim=1).indices[:, 1:])
    match = (y[torch.cat(neighbours)] == y[:, None]).cpu()
    out = {f"recall@{kk}": float(match[:, :kk].any(1).float().mean()) for kk in ks}
    y, count = y.cpu(), count.cpu()
    ap = rp = 0.0
    for i in range(len(z)):
        r = int(count[y[i]]) - 1
        hits = match[i, :r]
        rp += float(hits.sum()) / r
        found = 0
        for j in range(r):
            if hits[j]:
                found += 1
                ap += found / (j + 1) / r
    out.update({"map@r": ap / len(z), "r_precision": rp / len(z), "num_queries": len(z)})
    return out


# ------------------------------------------------------------------ training loop

class AuthorsTrainer:
    """The authors' loop over fastiaa's data and model definitions (module docstring).

    train/test: fastiaa.data.ImageSet; backbone: a fastiaa.models name (random init).
    ``train_epoch`` runs ``iterations`` balanced batches (fastiaa.data.BalancedBatchSampler),
    with synthesis once ``refresh`` has run and ``intra`` is set.
    """

    def __init__(self, backbone: str, train, test, *, batch: int, images_per_class: int, iterations: int,
                 resize_size: int, crop_size: int, workers: int, device: str, eval_batch: int,
                 intra: bool, lam: float, aug_num: int, lr: float = 1e-4, weight_decay: float = 1e-5,
                 embedding_size: int = 512, seed: int = 0):
        from fastiaa.data import BalancedBatchSampler
        from fastiaa.models import create_model
        from fastiaa.pipelines import NORMALIZATIONS

        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.model = create_model(backbone, embedding_size, pretrained=False).to(self.device)
        norm = NORMALIZATIONS[self.model.input_space]
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=lr, weight_decay=weight_decay)
        self.sampler = BalancedBatchSampler(train.labels, batch, images_per_class, iterations, seed)
        self.train_set, self.test_set = train, test
        self.intra, self.lam, self.aug_num = intra, lam, aug_num
        pin = self.device.type == "cuda"
        common = dict(num_workers=workers, pin_memory=pin, persistent_workers=workers > 0)
        self.train_loader = torch.utils.data.DataLoader(
            AuthorsImages(train, AuthorsTransform(norm, True, resize_size, crop_size)), batch_sampler=self.sampler,
            **common)
        # the official refresh embeds the train set with the train transform (docs/method.md §3)
        self.refresh_loader = torch.utils.data.DataLoader(
            AuthorsImages(train, AuthorsTransform(norm, True, resize_size, crop_size)), batch_size=eval_batch,
            **common)
        self.test_loader = torch.utils.data.DataLoader(
            AuthorsImages(test, AuthorsTransform(norm, False, resize_size, crop_size)), batch_size=eval_batch,
            **common)
        self.estimator = AuthorsLoops(train.num_classes, embedding_size, self.device)
        self.covariance = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def embed(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, D] float32 embeddings and [N] labels on the device, dataset order."""
        self.model.eval()
        feats, labels = [], []
        for images, y in loader:
            feats.append(self.model(images.to(self.device, non_blocking=True)))
            labels.append(y.to(self.device, non_blocking=True))
        return torch.cat(feats), torch.cat(labels)

    def refresh(self, correct_every: int = 1) -> dict:
        """Embed the train set, fold the statistics class by class, correct class by class.

        correct_every: run the correction loop on every n-th class only and scale its time by n
        (marked as extrapolated by the caller when n > 1). Returns seconds and images.
        """
        start = time.perf_counter()
        z, y = self.embed(self.refresh_loader)
        self.estimator.update(z, y)
        classes = range(0, self.estimator.ave.shape[0], correct_every)
        self.covariance = self.estimator.corrected(classes=classes)
        self._sync()
        seconds = time.perf_counter() - start
        loop = self.estimator.loop_seconds
        return {"seconds": seconds + loop * (correct_every - 1), "images": len(self.train_set),
                "extrapolated": correct_every > 1}

    def train_epoch(self, epoch: int) -> dict:
        """One epoch of ``iterations`` steps; images/s from the first batch request to the last step."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        synth = self.intra and self.covariance is not None
        start, images, losses = time.perf_counter(), 0, []
        for x, y in self.train_loader:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            z = self.model(x)
            synthetic = F.normalize(synthesize_loop(z, y, self.covariance, self.lam, self.aug_num), dim=-1) \
                if synth else None
            loss = ms_loss_loop(F.normalize(z, dim=-1), y, synthetic)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            losses.append(loss.item())
            images += len(y)
        seconds = time.perf_counter() - start
        return {"images_per_s": images / seconds, "seconds": seconds, "loss": sum(losses) / len(losses)}

    def evaluate(self, ks: tuple[int, ...]) -> dict:
        """Embed the test set and compute the official metrics; adds ``seconds`` and ``images``."""
        start = time.perf_counter()
        z, y = self.embed(self.test_loader)
        metrics = authors_retrieval(z, y, ks)
        self._sync()
        return {**metrics, "seconds": time.perf_counter() - start, "images": len(self.test_set)}
