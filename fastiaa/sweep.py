"""Sweeps: a grid of ``fastiaa train`` flags expanded into named runs under one directory, trained by
the ``local`` launcher (one after another, or one per group of visible GPUs) or the ``slurm`` launcher
(a job array through submitit); :func:`report` aggregates them (docs/architecture.md, "Sweeps").

A sweep file (YAML)::

    dir: runs/sweeps/kanji_iaa        # the sweep directory (default runs/sweeps/<file name>)
    flags: {preset: kanji}             # flags of every run
    arms: {iaa: {}, base: {intra: 0}}  # named variants (optional)
    grid: {seed: [0, 1, 2]}            # every combination of these values, for every arm
    compare: [[iaa, base]]             # paired comparisons (same seeds) in the report
    launcher: {name: local, gpus_per_run: 1}

Flags are spelt as on the command line (``intra_lamda``, ``--intra-lamda``) and parsed by its parser;
a flag is set in one place only (flags, an arm or the grid). A run is named
``<configuration>_s<seed>``: the configuration is the arm's name and the grid values that vary (the
seed aside), or ``fastiaa train``'s stem ``<dataset>_<backbone>_<loss>_<iaa|base>`` when neither
names it. Each run is ``fastiaa train FLAGS --save-dir SWEEP_DIR --name RUN --resume``, so re-running
a sweep skips finished runs (:func:`finished`) and resumes interrupted ones.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue

import submitit
import yaml

from fastiaa import flags
from fastiaa.config import TrainConfig

KEYS = ("dir", "flags", "arms", "grid", "compare", "launcher")
LAUNCHERS = ("local", "slurm")
SET_BY_THE_SWEEP = ("name", "save_dir", "resume")
MANIFEST = "sweep.json"


def finished(run_dir: str | os.PathLike) -> bool:
    """Whether the run in ``run_dir`` trained all its epochs (the trainer writes ``paper_comparison.md``
    after the last one)."""
    return (Path(run_dir) / "paper_comparison.md").is_file()


@dataclass(frozen=True)
class Run(submitit.helpers.Checkpointable):
    """One run of a sweep. Calling it trains it (``fastiaa train``; under torchrun for ``procs`` > 1),
    its output appended to ``<run dir>/train.log``; submitit requeues it on a SLURM timeout or preemption.

    Raises (when called):
        subprocess.CalledProcessError: the run failed (its log says why).
    """

    name: str
    configuration: str
    config: TrainConfig
    argv: tuple[str, ...]  # the `fastiaa train` flags, --save-dir / --name / --resume included
    procs: int             # processes (GPUs) of the run: torchrun for more than one
    cwd: str               # the folder the sweep was started in (relative flags resolve there)

    @property
    def dir(self) -> Path:
        return self.config.run_dir()

    @property
    def log(self) -> Path:
        return self.dir / "train.log"

    def command(self) -> list[str]:
        launch = [sys.executable]
        if self.procs > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(self.procs)]
        return [*launch, "-m", "fastiaa", "train", *self.argv]

    def __call__(self, gpus: Sequence[str] | None = None) -> None:
        env = dict(os.environ)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a") as log:
            log.write(f"$ {shlex.join(self.command())}\n")
            log.flush()
            subprocess.run(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.cwd, env=env, check=True)


@dataclass(frozen=True)
class Sweep:
    """A sweep file, expanded (:func:`load`)."""

    file: Path
    dir: Path
    runs: tuple[Run, ...]
    compare: tuple[tuple[str, str], ...]
    launcher: str             # local | slurm
    gpus_per_run: int
    slurm: dict               # the slurm launcher's submitit.AutoExecutor parameters


def load(file: str | os.PathLike, directory: str | None = None, seeds: int | None = None,
         gpus_per_run: int | None = None, train_flags: Sequence[str] = ()) -> Sweep:
    """Read a sweep file and expand it into its runs (module docstring).

    Args:
        directory, gpus_per_run: replace the file's ``dir`` and ``launcher.gpus_per_run``.
        seeds: the grid's seeds become ``0 .. seeds - 1``.
        train_flags: ``fastiaa train`` flags (argv) added to every run, after (over) the file's.

    Raises:
        FileNotFoundError: no such file. ValueError: a bad sweep (the message names the file and the
        fix): unknown keys or flags, bad values, an empty grid, runs with one name or one setting.
    """
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep file {path}")
    try:
        spec = yaml.safe_load(path.read_text())
        return _expand(spec if spec is not None else {}, path, directory, seeds, gpus_per_run, list(train_flags))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not a YAML file ({str(error).splitlines()[0]})") from None
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def _mapping(raw, where: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {raw!r}")
    return raw


def _flag_map(raw, where: str) -> dict:
    """{dest: (argparse action, value)} of a mapping of flags."""
    out = {}
    for key, value in _mapping(raw, where).items():
        try:
            action = flags.train_flag(key)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
        if action.dest in SET_BY_THE_SWEEP:
            raise ValueError(f"{where}: {action.option_strings[0]} is set by the sweep for every run; remove it")
        if action.dest in out:
            raise ValueError(f"{where}: {action.option_strings[0]} is given twice")
        out[action.dest] = (action, value)
    return out


def _text(value) -> str:
    """A flag value as the command line spells it (lists: joined by "-", as in a run name)."""
    if isinstance(value, list):
        return "-".join(map(_text, value))
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def _tokens(action, value) -> list[str]:
    if action.nargs == 0:  # a switch without a value (--save_models)
        return [action.option_strings[0]] if value else []
    return [action.option_strings[0], *map(_text, value if isinstance(value, list) else [value])]


def _refuse_clash(mine: dict, theirs: dict, here: str, there: str) -> None:
    both = sorted(set(mine) & set(theirs))
    if both:
        option = mine[both[0]][0].option_strings[0]
        raise ValueError(f"{option} is set in {here} and in {there}: set a flag in one place")


def _expand(spec, path: Path, directory, seeds, gpus_per_run, train_flags) -> Sweep:
    spec = _mapping(spec, "the sweep")
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; a sweep file has {', '.join(KEYS)}")
    common = _flag_map(spec.get("flags"), "flags")
    arms = {name: _flag_map(raw, f"arm {name!r}") for name, raw in _mapping(spec.get("arms"), "arms").items()}
    grid = _flag_map(spec.get("grid"), "grid")
    if seeds is not None:
        grid["seed"] = (flags.train_flag("seed"), list(range(seeds)))
    for action, values in grid.values():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid: {action.option_strings[0]} needs a non-empty list of values, got {values!r}")
    if not grid and not arms:
        raise ValueError("no runs: give `grid` (flag: [values, ...]) or `arms` (name: {flag: value})")
    _refuse_clash(common, grid, "flags", "grid")
    for name, arm in arms.items():
        if not re.fullmatch(r"[\w.=+-]+", str(name)):
            raise ValueError(f"arm {name!r}: an arm's name names directories: letters, digits and . _ = + - only")
        _refuse_clash(arm, common, f"arm {name!r}", "flags")
        _refuse_clash(arm, grid, f"arm {name!r}", "grid")
    launcher, procs, parameters = _launcher(spec, gpus_per_run)
    out = Path(directory or spec.get("dir") or Path("runs", "sweeps", path.stem)).absolute()
    runs = _runs(common, arms, grid, out, procs, train_flags)
    configurations = list(dict.fromkeys(run.configuration for run in runs))
    compare = []
    for pair in spec.get("compare") or []:
        if not isinstance(pair, list) or len(pair) != 2 or not set(pair) <= set(configurations):
            raise ValueError(f"compare: {pair!r} is not two of the configurations {configurations}")
        compare.append(tuple(pair))
    return Sweep(path, out, tuple(runs), tuple(compare), launcher, procs, parameters)


def _runs(common: dict, arms: dict, grid: dict, out: Path, procs: int, train_flags: list[str]) -> list[Run]:
    """Every arm x every grid point, named (module docstring); refuses two runs with one name or one setting."""
    varying = [dest for dest, (_, values) in grid.items() if len(values) > 1 and dest != "seed"]
    runs, names, settings = [], {}, {}
    for arm, arm_flags in (arms.items() or [(None, {})]):
        for point in itertools.product(*(values for _, values in grid.values())):
            chosen = dict(zip(grid, point))
            argv = [t for table in (common, arm_flags) for action, value in table.values()
                    for t in _tokens(action, value)]
            argv += [t for dest, value in chosen.items() for t in _tokens(grid[dest][0], value)] + train_flags
            where = ", ".join(([f"arm {arm!r}"] if arm else []) + [f"{d}={_text(v)}" for d, v in chosen.items()])
            try:
                cfg = flags.parse_train_flags(argv)
            except ValueError as error:
                raise ValueError(f"run {where}: {error}") from None
            parts = ([arm] if arm else []) + [f"{dest}={_text(chosen[dest])}" for dest in varying]
            configuration = re.sub(r"[^\w.=+-]", "-", "_".join(parts)) or cfg.run_stem()
            name = f"{configuration}_s{cfg.runtime.seed}"
            if name in names:
                extra = f"; the command line adds {shlex.join(train_flags)}" if train_flags else ""
                raise ValueError(f"two runs are named {name!r} ({names[name]} and {where}{extra}): give their "
                                 "arms or grid values distinct names")
            cfg = cfg.replace(save_dir=str(out), name=name, resume=True)
            key = tuple(sorted(cfg.replace(name=None).flat().items()))
            if key in settings:
                raise ValueError(f"runs {settings[key]!r} and {name!r} have the same settings: drop one")
            names[name], settings[key] = where, name
            runs.append(Run(name, configuration, cfg, (*argv, "--save-dir", str(out), "--name", name, "--resume"),
                            procs, os.getcwd()))
    return runs


def _launcher(spec: dict, gpus_per_run: int | None) -> tuple[str, int, dict]:
    settings = dict(_mapping(spec.get("launcher"), "launcher"))
    name = settings.pop("name", "local")
    procs = settings.pop("gpus_per_run", 1) if gpus_per_run is None else gpus_per_run
    if name not in LAUNCHERS:
        raise ValueError(f"launcher: name {name!r}; choose {' or '.join(LAUNCHERS)}")
    if not isinstance(procs, int) or isinstance(procs, bool) or procs < 1:
        raise ValueError(f"launcher: gpus_per_run must be an integer >= 1, got {procs!r}")
    if name == "local" and settings:
        raise ValueError(f"launcher: the local launcher takes name and gpus_per_run only, not {sorted(settings)}")
    return name, procs, settings


def check_settings(sweep: Sweep) -> None:
    """Refuse a sweep whose runs on disk were started with other settings (a finished run would be
    skipped, an interrupted one resumed, with the settings of the sweep file as it was).

    Raises:
        ValueError: the run directory, the settings that differ and the fix.
    """
    for run in sweep.runs:
        saved = run.dir / "config.json"
        if saved.is_file():
            changed = [c for c in run.config.differences(TrainConfig.from_json(saved.read_text()))
                       if not c.startswith(("--resume ", "--save-dir "))]
            if changed:
                raise ValueError(f"{run.dir} was started with other settings ({'; '.join(changed)}); restore the "
                                 "sweep's settings, or delete that directory to train the run again")


def write_manifest(sweep: Sweep) -> None:
    """``sweep.json`` in the sweep directory: its runs (name, configuration, seed, command) and comparisons."""
    from fastiaa.checkpoint import atomic_write_text

    runs = [{"name": r.name, "configuration": r.configuration, "seed": r.config.runtime.seed,
             "command": shlex.join(r.command())} for r in sweep.runs]
    atomic_write_text(sweep.dir / MANIFEST, json.dumps(
        {"file": str(sweep.file), "runs": runs, "compare": [list(p) for p in sweep.compare]}, indent=2) + "\n")


def visible_gpus() -> list[str]:
    """The GPUs this process may use: the entries of CUDA_VISIBLE_DEVICES, else 0 .. count - 1."""
    import torch

    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    return (listed.split(",") if listed else [str(i) for i in range(count)])[:count]


def run_local(runs: Sequence[Run], gpus_per_run: int, gpus: Sequence[str] | None = None) -> list[tuple[Run, str]]:
    """Train ``runs`` one after another on the CPU, or, with GPUs, as many at a time as there are
    groups of ``gpus_per_run`` of them (CUDA_VISIBLE_DEVICES set per run). A failed run does not stop
    the others; Ctrl-C stops them all (their state resumes).

    Args:
        gpus: the GPU ids to share out (default :func:`visible_gpus`).

    Returns:
        (run, why) of each failed run. Raises ValueError: a run needs more GPUs than are visible.
    """
    gpus = visible_gpus() if gpus is None else list(gpus)
    if gpus and gpus_per_run > len(gpus):
        raise ValueError(f"a run takes {gpus_per_run} GPUs (gpus_per_run) but {len(gpus)} are visible")
    groups = [gpus[i:i + gpus_per_run] for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)] or [None]
    free: Queue = Queue()
    for group in groups:
        free.put(group)

    def train(run: Run) -> None:
        group = free.get()
        on = f" on GPU {','.join(group)}" if group else ""
        print(f"training {run.name}{on} (log {run.log})", flush=True)
        try:
            run(group)
        finally:
            free.put(group)

    pool = ThreadPoolExecutor(len(groups))
    try:
        futures = [(run, pool.submit(train, run)) for run in runs]
        errors = [(run, future.exception()) for run, future in futures]
    except KeyboardInterrupt:
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    return [(run, f"exit status {e.returncode}" if isinstance(e, subprocess.CalledProcessError) else repr(e))
            for run, e in errors if e is not None]


def submit(sweep: Sweep, runs: Sequence[Run], cluster: str = "slurm") -> list:
    """Submit ``runs`` as one job array through ``submitit.AutoExecutor`` (``cluster="local"``: local
    processes, as the tests do): one task on one node with ``gpus_per_run`` GPUs per run, the file's
    launcher settings as submitit parameters (``timeout_min``, ``slurm_partition``, ...); submitit's logs
    go to ``<sweep dir>/submitit``. Returns the submitit jobs.

    Raises:
        FileNotFoundError: ``sbatch`` is not on PATH. ValueError: a parameter submitit rejects.
    """
    if cluster == "slurm" and shutil.which("sbatch") is None:
        raise FileNotFoundError("the slurm launcher needs sbatch on PATH: run the sweep on a SLURM login node "
                                "(or use launcher: {name: local})")
    executor = submitit.AutoExecutor(folder=sweep.dir / "submitit", cluster=cluster)
    try:
        executor.update_parameters(**{"name": sweep.file.stem, "nodes": 1, "tasks_per_node": 1,
                                      "gpus_per_node": sweep.gpus_per_run, **sweep.slurm})
    except (NameError, ValueError, AssertionError) as error:
        raise ValueError(f"{sweep.file}: launcher: {str(error).splitlines()[0]}") from None
    return executor.submit_array(list(runs))


def report(sweep_dir: str | os.PathLike, compare: Sequence[Sequence[str]] = ()) -> str:
    """Aggregate the finished runs of a sweep directory (fastiaa.report.summarize, paired, sweep_table)
    into ``report.md`` and ``report.png`` there; returns the Markdown.

    Args:
        compare: (a, b) configurations to compare by seed, beside the sweep file's ``compare``.

    Raises:
        FileNotFoundError: no ``sweep.json`` (not a sweep directory). ValueError: an unknown configuration.
    """
    from fastiaa import report as records
    from fastiaa.checkpoint import atomic_write_text

    root = Path(sweep_dir)
    if not (root / MANIFEST).is_file():
        raise FileNotFoundError(f"{root} is not a sweep directory (no {MANIFEST}; `fastiaa sweep` writes it)")
    manifest = json.loads((root / MANIFEST).read_text())
    configurations = list(dict.fromkeys(entry["configuration"] for entry in manifest["runs"]))
    results, papers, unfinished = {name: {} for name in configurations}, {}, []
    for entry in manifest["runs"]:
        run_dir = root / entry["name"]
        if not finished(run_dir):
            unfinished.append(entry["name"])
            continue
        cfg = TrainConfig.from_json((run_dir / "config.json").read_text())
        results[entry["configuration"]][cfg.runtime.seed] = records.MetricsLog(run_dir / "metrics.jsonl").records
        papers[entry["configuration"]] = records.paper_numbers(cfg.data.dataset, cfg.model.backbone,
                                                               cfg.optim.loss_name, cfg.iaa.intra)
    pairs = []
    for a, b in [*map(tuple, manifest["compare"]), *map(tuple, compare)]:
        for name in (a, b):
            if name not in configurations:
                raise ValueError(f"compare: no configuration {name!r} in {root}; it has {configurations}")
        pairs.append((a, b, *records.paired(results, a, b)))
    summary = records.summarize(results)
    done = len(manifest["runs"]) - len(unfinished)
    text = (f"# Sweep {root.name}: {done} of {len(manifest['runs'])} runs finished\n\n"
            + (f"Not finished (left out): {', '.join(unfinished)}.\n\n" if unfinished else "")
            + "Mean ± sample standard deviation over the seeds of each configuration (n runs), in percent, "
              "on the held-out classes.\n\n" + records.sweep_table(summary, papers, pairs))
    atomic_write_text(root / "report.md", text)
    if summary:
        records.sweep_plot({name: results[name] for name in summary}, summary, root / "report.png")
    return text
