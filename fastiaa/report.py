"""Run records: ``metrics.jsonl``, the ``losses_and_recalls.png`` plot, the ``retrievals.png`` pictures
and the paper table.

Every write rewrites the whole file atomically (they are small), so a killed run leaves
the records of its last finished epoch and a resumed run continues them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fastiaa.checkpoint import atomic_write, atomic_write_text

# Paper's Recall@1 / MAP@R in percent (docs/method.md §9), keyed by (backbone, loss) then dataset.
PAPER_RECALL1 = {
    ("googlenet", "ms"): {"cub200": 62.1, "cars196": 84.2, "stanford": 78.6, "inshop": 89.3},
    ("googlenet", "contrastive"): {"cub200": 61.7, "cars196": 80.8, "stanford": 77.8, "inshop": 88.8},
    ("googlenet", "triplet"): {"cub200": 58.9, "cars196": 72.4, "stanford": 76.9, "inshop": 88.6},
    ("bninception", "ms"): {"cub200": 66.5, "cars196": 85.3, "stanford": 80.5, "inshop": 92.0},
    ("resnet50", "ms"): {"cub200": 68.5, "cars196": 88.6, "stanford": 82.8, "inshop": 93.3},
}
PAPER_BASELINE_RECALL1 = {"cub200": 56.2, "cars196": 77.0, "stanford": 75.9, "inshop": 87.0}
PAPER_MAP_AT_R = {("googlenet", "ms"): {"cub200": 22.6, "cars196": 27.6, "stanford": 50.5, "inshop": 63.3}}


class MetricsLog:
    """The per-epoch records of a run (one JSON object per line)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = []
        if self.path.is_file():
            self.records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

    def truncate(self, last_epoch: int) -> None:
        """Drop records of epochs after ``last_epoch`` (a resumed run redoes them)."""
        self.records = [r for r in self.records if r["epoch"] <= last_epoch]
        self._write()

    def append(self, record: dict) -> None:
        self.records.append(record)
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))


def schedule_marks(records: list[dict]) -> tuple[list[int], int | None]:
    """(epochs that began with a statistics refresh, first epoch with synthesis or None) of a run's
    records: where the candidates of the loss change (docs/method.md §3, §5)."""
    refreshed = [r["epoch"] for r in records if "refresh_s" in r]
    synthesis = next((r["epoch"] for r in records if r.get("lambda", 0.0) > 0), None)
    return refreshed, synthesis


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(records: list[dict], path: str | Path) -> None:
    """Training loss and the Recall@K curves per epoch, side by side, saved as a PNG. Dotted lines
    mark the statistics refreshes, just before the epoch they begin, and a shaded band the epochs
    with synthesis (:func:`schedule_marks`): the loss jumps there because its candidates change."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(11, 4))
    trained = [r for r in records if r.get("loss") is not None]
    ax_loss.plot([r["epoch"] for r in trained], [r["loss"] for r in trained], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="Loss")
    evaluated = [r for r in records if any(k.startswith("recall@") for k in r)]
    keys = sorted({k for r in evaluated for k in r if k.startswith("recall@")}, key=lambda k: int(k[7:]))
    for key in keys + [k for k in ("map@r", "r_precision") if any(k in r for r in evaluated)]:
        pts = [(r["epoch"], 100 * r[key]) for r in evaluated if key in r]
        ax_rec.plot(*zip(*pts), marker=".", label=key.replace("recall@", "Recall@").replace("map@r", "MAP@R")
                    .replace("r_precision", "R-Precision"))
    ax_rec.set(xlabel="epoch", ylabel="%", title="Retrieval on held-out classes")
    refreshed, synthesis = schedule_marks(records)
    last = max((r["epoch"] for r in records), default=0)
    for ax in (ax_loss, ax_rec):
        if synthesis is not None:
            ax.axvspan(synthesis - 0.5, last + 0.5, color="tab:red", alpha=0.08, label="synthesis on")
        for i, epoch in enumerate(refreshed):
            ax.axvline(epoch - 0.5, color="dimgrey", linestyle=":", label="statistics refreshed" if i == 0 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if trained and (refreshed or synthesis is not None):
        ax_loss.legend(fontsize=8)
    if evaluated:
        ax_rec.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


@dataclass(frozen=True)
class Hit:
    """One neighbour: image ``path``, its ``label`` and its cosine ``similarity`` to the query."""

    path: str
    label: str
    similarity: float


@dataclass(frozen=True)
class Retrieval:
    """A query (``path``, ``label``, "" when unlabelled) and its ``hits``, nearest first."""

    path: str
    label: str
    hits: tuple[Hit, ...]


FRAME_COLOURS = {True: "#1a9641", False: "#d7191c", None: "#8c8c8c"}
"""Frame of a neighbour: same class as the query (green), another class (red), query unlabelled (grey)."""


def plot_retrievals(retrievals: list[Retrieval], path: str | Path, columns: int = 5) -> list[list[bool | None]]:
    """Each query (:class:`Retrieval`) in a row with its first ``columns`` neighbours, framed
    by :data:`FRAME_COLOURS`, the cosine similarity and the label under each; saved as a PNG.

    Returns:
        per row, per neighbour drawn: same class as the query (None: the query has no label).
    """
    from PIL import Image

    plt = _pyplot()
    rows = max(1, len(retrievals))
    fig, axes = plt.subplots(rows, columns + 1, figsize=(1.5 * (columns + 1), 1.75 * rows), squeeze=False)
    same = []
    for ax_row, retrieval in zip(axes, retrievals):
        cells = [(retrieval.path, "#2c7bb6", "query" + (f"\n{retrieval.label[:16]}" if retrieval.label else ""))]
        flags = [None if not retrieval.label else hit.label == retrieval.label for hit in retrieval.hits[:columns]]
        cells += [(hit.path, FRAME_COLOURS[flag], f"{hit.similarity:.3f}\n{hit.label[:16]}")
                  for hit, flag in zip(retrieval.hits, flags)]
        same.append(flags)
        for ax, (image_path, colour, caption) in zip(ax_row, cells):
            try:
                with Image.open(image_path) as image:
                    thumb = image.convert("RGB")
                thumb.thumbnail((128, 128))
                ax.imshow(thumb)
            except Exception:  # a picture never fails a run: an unreadable image shows as an empty cell
                caption += "\n(unreadable)"
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set(color=colour, linewidth=4)
            ax.set_xlabel(caption, fontsize=7)
        for ax in ax_row[len(cells):]:
            ax.axis("off")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return same


def paper_comparison(best: dict, dataset: str, backbone: str, loss: str) -> str:
    """Markdown table of the run's best metrics next to the paper's (docs/method.md §9)."""
    rows = ["| metric | this run | paper |", "|---|---|---|"]
    for key in sorted((k for k in best if k.startswith("recall@")), key=lambda k: int(k[7:])):
        paper = PAPER_RECALL1.get((backbone, loss), {}).get(dataset) if key == "recall@1" else None
        rows.append(f"| Recall@{key[7:]} | {100 * best[key]:.1f} | {'' if paper is None else f'{paper:.1f}'} |")
    if "map@r" in best:
        paper = PAPER_MAP_AT_R.get((backbone, loss), {}).get(dataset)
        rows.append(f"| MAP@R | {100 * best['map@r']:.1f} | {'' if paper is None else f'{paper:.1f}'} |")
    if "r_precision" in best:
        rows.append(f"| R-Precision | {100 * best['r_precision']:.1f} | |")
    base = PAPER_BASELINE_RECALL1.get(dataset)
    if base is not None and loss == "ms" and backbone == "googlenet":
        rows.append(f"| (paper MS baseline Recall@1) | | {base:.1f} |")
    return "\n".join(rows) + "\n"
