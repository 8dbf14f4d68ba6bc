"""Run records: ``metrics.jsonl``, the ``losses_and_recalls.png`` plot, the ``retrievals.png`` pictures
and the paper table; the tables and plots of a sweep: mean ± standard deviation over seeds, paired
differences.

Every write rewrites the whole file atomically (they are small), so a killed run leaves
the records of its last finished epoch and a resumed run continues them.
"""
from __future__ import annotations

import json
import statistics
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
        """Drop records of epochs after ``last_epoch`` (a resumed run redoes them; -1 drops all)."""
        self.records = [r for r in self.records if r["epoch"] <= last_epoch]
        self._write()

    def append(self, record: dict) -> None:
        self.records.append(record)
        self._write()

    def _write(self) -> None:
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records))


def metric_keys(records: list[dict]) -> list[str]:
    """The metrics in ``records``: ``recall@K`` by increasing K, then ``map@r`` and ``r_precision``."""
    present = {k for r in records for k in r}
    recalls = sorted((k for k in present if k.startswith("recall@")), key=lambda k: int(k[7:]))
    return recalls + [k for k in ("map@r", "r_precision") if k in present]


def label(key: str) -> str:
    """``recall@4`` -> ``Recall@4``, ``map@r`` -> ``MAP@R``, ``r_precision`` -> ``R-Precision``."""
    return {"map@r": "MAP@R", "r_precision": "R-Precision"}.get(key, key.replace("recall@", "Recall@"))


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


def _save(fig, path: str | Path, dpi: int = 110) -> None:
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    _pyplot().close(fig)


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
    for key in metric_keys(evaluated):
        pts = [(r["epoch"], 100 * r[key]) for r in evaluated if key in r]
        ax_rec.plot(*zip(*pts), marker=".", label=label(key))
    ax_rec.set(xlabel="epoch", ylabel="%", title="Retrieval on held-out classes")
    refreshed, synthesis = schedule_marks(records)
    last = max((r["epoch"] for r in records), default=0)
    for ax in (ax_loss, ax_rec):
        if synthesis is not None:
            ax.axvspan(synthesis - 0.5, last + 0.5, color="tab:red", alpha=0.08, label="synthesis on")
        for i, epoch in enumerate(refreshed):
            ax.axvline(epoch - 0.5, color="dimgrey", linestyle=":", label="statistics refreshed" if i == 0 else None)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if trained and (refreshed or synthesis is not None):
        ax_loss.legend(fontsize=8)
    if evaluated:
        ax_rec.legend(fontsize=8)
    _save(fig, path)


def paper_numbers(dataset: str, backbone: str, loss: str, intra: bool = True) -> dict[str, float]:
    """The paper's ``recall@1`` and ``map@r`` in percent (docs/method.md §9) for this loss and backbone
    with IAA, or for ``intra`` False its MS baseline (GoogLeNet only); ``{}`` where it reports none."""
    if intra:
        found = {"recall@1": PAPER_RECALL1.get((backbone, loss), {}).get(dataset),
                 "map@r": PAPER_MAP_AT_R.get((backbone, loss), {}).get(dataset)}
    else:
        found = {"recall@1": PAPER_BASELINE_RECALL1.get(dataset) if (backbone, loss) == ("googlenet", "ms") else None}
    return {k: v for k, v in found.items() if v is not None}


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
    paper = paper_numbers(dataset, backbone, loss)
    rows = ["| metric | this run | paper |", "|---|---|---|"]
    for key in metric_keys([best]):
        rows.append(f"| {label(key)} | {100 * best[key]:.1f} | {f'{paper[key]:.1f}' if key in paper else ''} |")
    base = paper_numbers(dataset, backbone, loss, intra=False).get("recall@1")
    if base is not None:
        rows.append(f"| (paper MS baseline Recall@1) | | {base:.1f} |")
    return "\n".join(rows) + "\n"


# -- sweeps: results is {configuration: {seed: the run's metrics.jsonl records}} ----------------

PHASES = {"last": "Last epoch",
          "best": "Best epoch of each run (highest Recall@1 on the test set, as the papers choose it: this flatters)"}


def last_and_best(records: list[dict]) -> tuple[dict, dict] | None:
    """The last evaluated record of a run and its best one (highest Recall@K of the smallest K over the
    trained epochs, the earliest such epoch, as the trainer's ``best.pt``; epoch 0, the model before
    training, only when no trained epoch was evaluated); None when no epoch was evaluated."""
    evaluated = [r for r in records if any(k.startswith("recall@") for k in r)]
    if not evaluated:
        return None
    key = metric_keys(evaluated)[0]
    trained = [r for r in evaluated if r["epoch"] > 0] or evaluated
    return evaluated[-1], max(trained, key=lambda r: r[key])


def spread(values) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (n - 1 in the denominator; None for one value) and n."""
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values)


def _phase_records(runs: dict[int, list[dict]]) -> dict[int, tuple[dict, dict]]:
    return {seed: picked for seed, records in sorted(runs.items()) if (picked := last_and_best(records))}


def _common_keys(records: list[dict]) -> list[str]:
    return [k for k in metric_keys(records) if all(k in r for r in records)]


def summarize(results: dict[str, dict[int, list[dict]]]) -> dict[str, dict[str, dict[str, tuple]]]:
    """{configuration: {"last" | "best": {metric: (mean, std, n)}}} in percent over the runs that were
    evaluated, with ``"epoch"``: the epochs picked."""
    summary = {}
    for name, runs in results.items():
        picked = list(_phase_records(runs).values())
        if picked:
            summary[name] = {}
            for i, phase in enumerate(PHASES):
                records = [pair[i] for pair in picked]
                summary[name][phase] = {"epoch": spread(r["epoch"] for r in records),
                                        **{k: spread(100 * r[k] for r in records) for k in _common_keys(records)}}
    return summary


def paired(results: dict[str, dict[int, list[dict]]], a: str, b: str) -> tuple[list[int], dict]:
    """The seeds that ``a`` and ``b`` both have, and {"last" | "best": {metric: (mean, std, n)}} of the
    per-seed differences ``a - b`` in percent points (``{}`` without a common seed)."""
    ra, rb = _phase_records(results.get(a, {})), _phase_records(results.get(b, {}))
    seeds, diffs = sorted(set(ra) & set(rb)), {}
    for i, phase in enumerate(PHASES if seeds else ()):
        x, y = [ra[s][i] for s in seeds], [rb[s][i] for s in seeds]
        diffs[phase] = {k: spread(100 * (p[k] - q[k]) for p, q in zip(x, y)) for k in _common_keys(x + y)}
    return seeds, diffs


def _pm(stat: tuple, signed: bool = False) -> str:
    mean, std, _ = stat
    text = f"{mean:+.2f}" if signed else f"{mean:.2f}"
    return text if std is None else f"{text} ± {std:.2f}"


def _sigmas(stat: tuple, paper: float) -> str:
    mean, std, _ = stat
    return f"{(mean - paper) / std:+.1f}σ" if std else "–"


def sweep_table(summary: dict, papers: dict[str, dict[str, float]], pairs: list[tuple]) -> str:
    """Markdown: a table per phase (last epoch, best epoch), the paper's numbers beside each
    configuration with the difference in standard deviations, and the paired differences
    (``pairs``: ``(a, b, seeds, paired(...)[1])``)."""
    if not summary:
        return "No run has finished yet.\n"
    keys = metric_keys([stats["last"] for stats in summary.values()])
    lines = []
    for phase, title in PHASES.items():
        lines += [f"## {title}", "", "| configuration | n | epoch | " + " | ".join(map(label, keys)) + " |",
                  "|---" * (3 + len(keys)) + "|"]
        for name, stats in summary.items():
            s = stats[phase]
            lines.append(f"| {name} | {s['epoch'][2]} | {s['epoch'][0]:.3g} | "
                         + " | ".join(_pm(s[k]) if k in s else "" for k in keys) + " |")
        lines.append("")
    rows = [(name, key, value) for name, numbers in papers.items() if name in summary
            for key, value in numbers.items() if key in summary[name]["last"]]
    if rows:
        lines += ["## Against the paper (docs/method.md §9): (mean - paper) / standard deviation", "",
                  "| configuration | metric | paper | last epoch | Δ / σ | best epoch | Δ / σ |", "|---" * 7 + "|"]
        for name, key, value in rows:
            last, best = summary[name]["last"][key], summary[name]["best"][key]
            lines.append(f"| {name} | {label(key)} | {value:.1f} | {_pm(last)} | {_sigmas(last, value)} | "
                         f"{_pm(best)} | {_sigmas(best, value)} |")
        lines.append("")
    if pairs:
        lines += ["## Paired differences (same seeds): mean ± standard deviation of the per-seed differences", "",
                  "| comparison | seeds | metric | last epoch | best epoch |", "|---" * 5 + "|"]
        for a, b, seeds, diffs in pairs:
            for key in diffs.get("last", {}):
                best = diffs["best"].get(key)
                lines.append(f"| {a} − {b} | {', '.join(map(str, seeds))} | {label(key)} | "
                             f"{_pm(diffs['last'][key], True)} | {'' if best is None else _pm(best, True)} |")
            if not seeds:
                lines.append(f"| {a} − {b} | none finished in both | | | |")
        lines.append("")
    return "\n".join(lines)


def sweep_plot(results: dict[str, dict[int, list[dict]]], summary: dict, path: str | Path) -> None:
    """Recall@K (smallest K) per epoch, mean with a ± standard deviation band per configuration, and
    bars with error bars of the last epoch's Recall@K, MAP@R and R-Precision; saved as a PNG."""
    fig, (ax_curve, ax_bars) = _pyplot().subplots(1, 2, figsize=(13, 4.5))
    keys = metric_keys([stats["last"] for stats in summary.values()])
    shown = [k for k in keys[:1] + ["map@r", "r_precision"] if k in keys]
    width = 0.8 / max(1, len(summary))
    for i, (name, stats) in enumerate(summary.items()):
        per_epoch: dict[int, list[float]] = {}
        for records in results[name].values():
            for r in records:
                if keys[0] in r:
                    per_epoch.setdefault(r["epoch"], []).append(100 * r[keys[0]])
        epochs = sorted(per_epoch)
        curve = [spread(per_epoch[e]) for e in epochs]
        mean, std = [m for m, _, _ in curve], [s or 0.0 for _, s, _ in curve]
        (line,) = ax_curve.plot(epochs, mean, marker=".", label=name)
        ax_curve.fill_between(epochs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                              color=line.get_color(), alpha=0.2)
        bars = [stats["last"].get(k, (float("nan"), None, 0)) for k in shown]
        ax_bars.bar([j + i * width for j in range(len(shown))], [m for m, _, _ in bars], width,
                    yerr=[s or 0.0 for _, s, _ in bars], capsize=3, color=line.get_color(), label=name)
    from matplotlib.ticker import MaxNLocator

    ax_curve.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_curve.set(xlabel="epoch", ylabel="%", title=f"{label(keys[0])} on held-out classes (mean ± std over seeds)")
    ax_bars.set_xticks([j + width * (len(summary) - 1) / 2 for j in range(len(shown))], [label(k) for k in shown])
    ax_bars.set(ylabel="%", title="Last epoch (mean ± std over seeds)")
    for ax in (ax_curve, ax_bars):
        ax.legend(fontsize=8)
    _save(fig, path)
