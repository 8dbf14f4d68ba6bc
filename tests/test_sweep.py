"""Sweeps and reports: a tiny 2 x 2 sweep through the local launcher and through submitit's local
executor (real subprocesses), kills and resumes, the report against a hand computation, the SLURM
job parameters, GPU sharing of the local launcher and the errors of bad sweep files."""
from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from fastiaa import cli, report, sweep
from fastiaa.train import Trainer

REPO = Path(__file__).resolve().parents[1]
# both spellings of the flags, as on the command line; a few steps on 32 px crops
TINY = {"dataset": "kanji", "backbone": "efficientnet_lite0", "pretrained": 0, "image-size": 32, "resize_size": 36,
        "batch": 24, "eval_batch": 96, "num_image_per_class": 3, "iter-per-epoch": 1, "epochs": 2, "start_epoch": 1,
        "update_every_M_epoch": 1, "lr-decay-epochs": [2], "embedding-size": 16, "workers": 0, "correction": "on",
        "num_neighbor": 5, "eval-every": 2, "amp": "off"}


def write_sweep(tmp_path: Path, kanji_root, **spec) -> Path:
    """A sweep file: arms iaa and base (--intra 0) x seeds 0, 1 on the tiny kanji set."""
    spec = {"dir": str(tmp_path / "sweep"), "flags": {**TINY, "data": str(kanji_root)},
            "arms": {"iaa": {}, "base": {"intra": 0}}, "grid": {"seed": [0, 1]}, "compare": [["iaa", "base"]], **spec}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def killed_in_epoch(run: sweep.Run, epoch: int) -> None:
    """Train ``run`` in this process and stop it during ``epoch``, as a kill would."""
    trainer = Trainer(run.config)
    real = trainer.train_epoch

    def crash(e):
        if e == epoch:
            raise KeyboardInterrupt
        return real(e)

    trainer.train_epoch = crash
    with pytest.raises(KeyboardInterrupt):
        trainer.run()


def hand_stats(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def test_local_sweep_resumes_killed_runs_skips_finished_ones_and_reports_mean_and_std(kanji_root, tmp_path, capsys):
    path = write_sweep(tmp_path, kanji_root)
    plan = sweep.load(path)
    assert [r.name for r in plan.runs] == ["iaa_s0", "iaa_s1", "base_s0", "base_s1"]
    assert all(r.dir == tmp_path / "sweep" / r.name for r in plan.runs)
    assert [(r.config.iaa.intra, r.config.runtime.seed) for r in plan.runs] == [(True, 0), (True, 1), (False, 0),
                                                                                 (False, 1)]
    runs = {r.name: r for r in plan.runs}
    killed_in_epoch(runs["iaa_s0"], 2)    # last.pt holds epoch 1
    killed_in_epoch(runs["base_s1"], 1)   # no checkpoint yet, only the epoch-0 record
    assert [r["epoch"] for r in records(runs["iaa_s0"].dir)] == [0, 1]
    assert [r["epoch"] for r in records(runs["base_s1"].dir)] == [0]

    assert cli.main(["sweep", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 runs in" in out and "0 finished, 4 to train" in out
    for run in plan.runs:
        assert [r["epoch"] for r in records(run.dir)] == [0, 1, 2], run.name
        assert sweep.finished(run.dir) and (run.dir / "train.log").is_file()
    assert "resumed from" in runs["iaa_s0"].log.read_text()
    assert "holds no last.pt yet" in runs["base_s1"].log.read_text()
    manifest = json.loads((plan.dir / "sweep.json").read_text())
    assert [(e["name"], e["configuration"], e["seed"]) for e in manifest["runs"]] == [
        ("iaa_s0", "iaa", 0), ("iaa_s1", "iaa", 1), ("base_s0", "base", 0), ("base_s1", "base", 1)]

    # re-running trains nothing
    logs = {r.name: r.log.read_text() for r in plan.runs}
    assert cli.main(["sweep", str(path)]) == 0
    assert "4 finished, 0 to train" in capsys.readouterr().out
    assert {r.name: r.log.read_text() for r in plan.runs} == logs

    # the report against a hand computation from metrics.jsonl
    recs = {r.name: [x for x in records(r.dir) if "recall@1" in x] for r in plan.runs}
    last = {name: rs[-1] for name, rs in recs.items()}
    best = {name: max((x for x in rs if x["epoch"] > 0), key=lambda x: x["recall@1"]) for name, rs in recs.items()}
    text = (plan.dir / "report.md").read_text()
    assert (plan.dir / "report.png").stat().st_size > 10_000
    for config in ("iaa", "base"):
        names = [f"{config}_s0", f"{config}_s1"]
        row = (f"| {config} | 2 | 2 | {hand_stats([100 * last[n]['recall@1'] for n in names])} | "
               f"{hand_stats([100 * last[n]['recall@2'] for n in names])} |")
        assert row in text
        assert f"| {hand_stats([100 * best[n]['map@r'] for n in names])} |" in text
    diffs = [100 * (last[f"iaa_s{s}"]["map@r"] - last[f"base_s{s}"]["map@r"]) for s in (0, 1)]
    assert (f"| iaa − base | 0, 1 | MAP@R | {statistics.mean(diffs):+.2f} ± {statistics.stdev(diffs):.2f} |"
            in text)
    summary = report.summarize({c: {s: records(plan.dir / f"{c}_s{s}") for s in (0, 1)} for c in ("iaa", "base")})
    mean, std, n = summary["base"]["best"]["r_precision"]
    values = [100 * best[f"base_s{s}"]["r_precision"] for s in (0, 1)]
    assert (mean, std, n) == pytest.approx((statistics.mean(values), statistics.stdev(values), 2))
    assert summary["iaa"]["best"]["epoch"][0] == statistics.mean(best[f"iaa_s{s}"]["epoch"] for s in (0, 1))

    # another pair on the command line: the differences change sign
    assert cli.main(["report", str(plan.dir), "--compare", "base", "iaa"]) == 0
    assert f"| base − iaa | 0, 1 | MAP@R | {-statistics.mean(diffs):+.2f} ±" in capsys.readouterr().out
    assert cli.main(["report", str(plan.dir), "--compare", "base", "nope"]) == 2
    assert "no configuration 'nope'" in capsys.readouterr().err


def test_sweep_through_submitits_local_executor(kanji_root, tmp_path, monkeypatch):
    """Two losses x two seeds, one epoch each, as submitit job processes (all at once: a thread each)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = write_sweep(tmp_path, kanji_root, flags={**TINY, "data": str(kanji_root), "epochs": 1, "eval-every": 1},
                       arms={"ms": {}, "triplet": {"loss": "Triplet"}}, compare=[],
                       launcher={"name": "slurm", "gpus_per_run": 1, "timeout_min": 10})
    plan = sweep.load(path)
    sweep.write_manifest(plan)
    jobs = sweep.submit(plan, plan.runs, cluster="local")
    assert [job.result() for job in jobs] == [None] * 4  # each raises if its run failed
    for run in plan.runs:
        assert [r["epoch"] for r in records(run.dir)] == [0, 1] and sweep.finished(run.dir), run.name
        assert run.config.optim.loss_name == run.name.split("_")[0]
    text = sweep.report(plan.dir)
    assert "4 of 4 runs finished" in text and "| triplet | 2 | 1 |" in text


def test_slurm_job_array_parameters_and_commands(kanji_root, tmp_path, monkeypatch, capsys):
    """The sbatch file and the pickled job of each array task, with stand-ins for sbatch and srun."""
    import submitit

    launcher = {"name": "slurm", "gpus_per_run": 2, "timeout_min": 90, "slurm_partition": "gpu",
                "cpus_per_task": 8, "slurm_array_parallelism": 3}
    path = write_sweep(tmp_path, kanji_root, launcher=launcher)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert cli.main(["sweep", str(path)]) == 2
    assert "the slurm launcher needs sbatch on PATH" in capsys.readouterr().err
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/submitted.sh\necho "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    plan = sweep.load(path)
    done = plan.runs[1]
    done.dir.mkdir(parents=True)
    (done.dir / "paper_comparison.md").write_text("finished\n")  # a finished run is not submitted
    assert cli.main(["sweep", str(path)]) == 0
    assert "submitted 3 runs (4242_0, 4242_1, 4242_2)" in capsys.readouterr().out
    sbatch = (tmp_path / "submitted.sh").read_text()
    for line in ("--array=0-2%3", "--gpus-per-node=2", "--time=90", "--partition=gpu", "--cpus-per-task=8",
                 "--nodes=1", "--ntasks-per-node=1", "--job-name=tiny"):
        assert f"#SBATCH {line}\n" in sbatch, line
    commands = []
    for i in range(3):
        job = submitit.SlurmJob(folder=plan.dir / "submitit", job_id=f"4242_{i}")
        submitted = job.submission().function
        assert isinstance(submitted, sweep.Run) and isinstance(submitted, submitit.helpers.Checkpointable)
        commands.append(submitted.command())
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fastiaa",
             "train"]
    assert [c[:len(train)] for c in commands] == [train] * 3
    assert [c[-5:] for c in commands] == [["--save-dir", str(plan.dir), "--name", name, "--resume"]
                                          for name in ("iaa_s0", "base_s0", "base_s1")]
    assert all("--intra" in c for c in commands[1:]) and "--intra" not in commands[0]
    typo = sweep.load(write_sweep(tmp_path, kanji_root, launcher={**launcher, "slurm_partiton": "gpu"}))
    with pytest.raises(ValueError, match="launcher: Unknown argument 'partiton' for executor 'slurm'"):
        sweep.submit(typo, typo.runs)


def test_a_failed_run_is_reported_with_its_log(kanji_root, tmp_path, capsys):
    flags = {**{k: v for k, v in TINY.items() if k != "batch"}, "data": str(kanji_root)}
    path = write_sweep(tmp_path, kanji_root, flags=flags, arms={"big": {"batch": 100_000}}, grid={"seed": [0]},
                       compare=[])
    assert cli.main(["sweep", str(path)]) == 1
    log = tmp_path / "sweep" / "big_s0" / "train.log"
    out, err = capsys.readouterr()
    assert err == (f"fastiaa sweep: big_s0 failed (exit status 2); log {log}: fastiaa train: "
                   "error: --batch 100000 is larger than the train set (192 images)\n")
    assert not sweep.finished(log.parent) and "No run has finished yet." in out


def test_local_launcher_shares_visible_gpus_and_survives_a_failed_run(tmp_path, capsys):
    """Five GPUs, two per run: two runs at a time on disjoint pairs; a failed run does not stop the others."""
    lock, running, seen = threading.Lock(), [], []

    class FakeRun:
        def __init__(self, name, fails=False):
            self.name, self.log, self.fails = name, tmp_path / f"{name}.log", fails

        def __call__(self, gpus):
            with lock:
                running.append(tuple(gpus))
                seen.append(list(running))
            time.sleep(0.05)
            with lock:
                running.remove(tuple(gpus))
            if self.fails:
                raise subprocess.CalledProcessError(3, ["fastiaa", "train"])

    runs = [FakeRun(f"r{i}", fails=i == 1) for i in range(5)]
    failed = sweep.run_local(runs, 2, gpus=["0", "1", "2", "3", "4"])
    assert [(run.name, why) for run, why in failed] == [("r1", "exit status 3")]
    assert max(len(now) for now in seen) == 2
    assert all(len(set(now)) == len(now) for now in seen)                  # never one pair twice at once
    assert {g for now in seen for g in now} == {("0", "1"), ("2", "3")}    # GPU 4 stays idle
    assert capsys.readouterr().out.count("training r") == 5
    with pytest.raises(ValueError, match="takes 4 GPUs .* 2 are visible"):
        sweep.run_local(runs, 4, gpus=["0", "1"])


@pytest.mark.parametrize("spec, message", [
    ({"flags": {"lamda": 0.6}}, "flags: unknown flag 'lamda' of `fastiaa train`"),
    ({"grid": {"intra-lambda": [0.4, 0.6]}}, "did you mean --intra-lamda?"),
    ({"grid": {"seed": []}}, "grid: --seed needs a non-empty list of values"),
    ({"grid": {}, "arms": {}}, "no runs: give `grid`"),
    ({"flags": TINY, "grid": {"seed": [0], "data": ["x/kanji", "x-kanji"]}},
     "two runs are named 'iaa_data=x-kanji_s0' (arm 'iaa', seed=0, data=x/kanji and arm 'iaa', seed=0, data=x-kanji)"),
    ({"arms": {"a": {}, "b": {"intra": 1}}}, "runs 'a_s0' and 'b_s0' have the same settings"),
    ({"flags": {**TINY, "seed": 1}}, "--seed is set in flags and in grid: set a flag in one place"),
    ({"arms": {"a": {"seed": 1}}}, "--seed is set in arm 'a' and in grid"),
    ({"grid": {"lr": [1e-4, -1]}}, "argument --lr: must be > 0, got -1"),
    ({"flags": {"name": "x"}}, "--name is set by the sweep for every run"),
    ({"grids": {}}, "unknown keys ['grids']"),
    ({"compare": [["iaa", "ms"]]}, "compare: ['iaa', 'ms'] is not two of the configurations ['iaa', 'base']"),
    ({"launcher": {"name": "pbs"}}, "launcher: name 'pbs'; choose local or slurm"),
    ({"launcher": {"gpus_per_run": 0}}, "gpus_per_run must be an integer >= 1"),
    ({"launcher": {"name": "local", "timeout_min": 5}}, "the local launcher takes name and gpus_per_run only"),
])
def test_bad_sweep_files_get_one_line_errors(tmp_path, capsys, spec, message):
    path = write_sweep(tmp_path, "data/kanji", **spec)
    with pytest.raises(ValueError) as error:
        sweep.load(path)
    assert message in str(error.value) and str(error.value).startswith(str(path))
    assert cli.main(["sweep", "--dry-run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fastiaa sweep: error: {path}: ") and message in err and len(err.splitlines()) == 1


def test_command_line_seeds_and_flags_and_misplaced_options(tmp_path, capsys):
    path = write_sweep(tmp_path, "data/kanji")
    with pytest.raises(ValueError, match=r"two runs are named 'iaa_s3' \(arm 'iaa', seed=0 and arm 'iaa', seed=1; "
                                         r"the command line adds --seed 3\)"):
        sweep.load(path, train_flags=["--seed", "3"])  # the command line overrides the grid's seeds
    plan = sweep.load(path, seeds=3, train_flags=["--lr", "2e-4"])
    assert [r.name for r in plan.runs] == [f"{a}_s{s}" for a in ("iaa", "base") for s in range(3)]
    assert {r.config.optim.lr for r in plan.runs} == {2e-4}
    assert cli.main(["sweep", str(path), "--dry-run"]) == 2
    assert "--dry-run is a sweep option: put it before the sweep file" in capsys.readouterr().err


def test_changed_settings_of_a_started_run_are_refused(tmp_path):
    path = write_sweep(tmp_path, "data/kanji")
    plan = sweep.load(path)
    plan.runs[0].dir.mkdir(parents=True)
    (plan.runs[0].dir / "config.json").write_text(plan.runs[0].config.replace(lr=1e-3, resume=False).to_json())
    with pytest.raises(ValueError, match=r"iaa_s0 was started with other settings \(--lr 0.001 -> 5e-05\)"):
        sweep.check_settings(plan)


def test_make_reproduce_is_a_sweep_over_seeds_of_the_published_command(tmp_path, capsys):
    out = subprocess.run(["make", "-n", "reproduce", "DATASET=cub200", "SEEDS=2", f"DATA={tmp_path / 'none'}",
                          "WEIGHTS=/weights"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if " sweep " in line)
    argv = shlex.split(line)[1:]
    assert argv[:7] == ["sweep", "--dir", "runs/reproduce_cub200", "--seeds", "2", "--gpus-per-run", "1"]
    argv[argv.index("runs/reproduce_cub200")] = str(tmp_path / "reproduce")
    assert cli.main(argv[:1] + ["--dry-run"] + argv[1:]) == 0
    listed = capsys.readouterr().out
    assert "new      cub200_googlenet_ms_iaa_s0:" in listed and "new      cub200_googlenet_ms_iaa_s1:" in listed
    plan = sweep.load(REPO / "sweeps/reproduce.yaml", seeds=2, train_flags=["--preset", "cub200"])
    assert {(r.config.model.backbone, r.config.iaa.intra_lamda, r.config.iaa.aug_num) for r in plan.runs} == {
        ("googlenet", 0.8, 3)}
    assert report.paper_numbers("cub200", "googlenet", "ms") == {"recall@1": 62.1, "map@r": 22.6}
    # without the dataset: one line before any run starts
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastiaa sweep: error:") and "CUB_200_2011" in err
    assert not list((tmp_path / "reproduce").glob("*_s0"))
    bad = subprocess.run(["make", "-n", "reproduce", "DATASET=kanji"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode != 0 and "make reproduce needs DATASET=cub200" in bad.stderr


def test_kanji_sweep_file_expands_to_three_arms_of_three_seeds():
    plan = sweep.load(REPO / "sweeps/kanji_iaa.yaml")
    assert [r.name for r in plan.runs] == [f"{a}_s{s}" for a in ("ms_iaa", "ms", "ms_iaa_official") for s in range(3)]
    iaa, base, official = (plan.runs[i].config for i in (0, 3, 6))
    assert (iaa.optim.epochs, iaa.optim.iter_per_epoch, iaa.data.image_size) == (6, 40, 96)  # `make train`'s budget
    assert iaa.iaa.intra and not base.iaa.intra
    assert official.replace(official_uncorrected_sampling=False, official_repeated_sqrt=False,
                            official_zero_mean_singletons=False, official_sentinel_normalization=False,
                            name=iaa.runtime.name) == iaa
    assert plan.compare == (("ms_iaa", "ms"), ("ms_iaa_official", "ms_iaa"))


def test_best_epoch_is_a_trained_epoch():
    """Epoch 0 (the model before training) is recorded but chosen only when no trained epoch was
    evaluated; ties go to the earliest epoch, as the trainer's best.pt."""
    from fastiaa import report

    records = [{"epoch": 0, "recall@1": 0.9}, {"epoch": 1, "loss": 1.0, "recall@1": 0.5},
               {"epoch": 2, "loss": 0.9, "recall@1": 0.7}, {"epoch": 3, "loss": 0.8, "recall@1": 0.7}]
    last, best = report.last_and_best(records)
    assert (last["epoch"], best["epoch"]) == (3, 2)
    assert report.last_and_best(records[:1])[1]["epoch"] == 0
