"""Bad input and faults, as a careless or unlucky user meets them: every case ends in a one-line
error that says what to fix (exit 2) or in a correct run, never in a traceback or a silent wrong
result. Error cases run ``fastiaa.cli.main`` in this process (argv in, stderr and exit code out:
what the ``fastiaa`` entry point runs); kills, signals and worker clean-up run real ``fastiaa``
processes. The README's reliability section counts the cases of this module."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastiaa import cli, flags

TINY = ["--dataset", "kanji", "--backbone", "efficientnet_lite0", "--image-size", "48", "--resize-size", "56",
        "--batch", "24", "--eval_batch", "96", "--num_image_per_class", "3", "--iter-per-epoch", "2", "--epochs", "2",
        "--start_epoch", "1", "--update_every_M_epoch", "1", "--embedding-size", "32", "--workers", "0",
        "--lr-decay-epochs", "2"]


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = cli.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """The command failed with exit code 2 and one line `fastiaa ...` holding every needle, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("fastiaa ")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, (code, err[-2000:])
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture
def data(kanji_root, tmp_path) -> Path:
    """A private copy of the small kanji dataset, free to damage."""
    return Path(shutil.copytree(kanji_root, tmp_path / "kanji"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- flags that cannot train

@pytest.mark.parametrize("flags, needle", [
    (["--lr", "nan"], "--lr nan: must be a finite number > 0"),
    (["--lr", "inf"], "--lr inf: must be a finite number > 0"),
    (["--head-lr-mult", "nan"], "--head-lr-mult nan"),
    (["--lr", "1e30", "--head-lr-mult", "1e10"], "within float32"),
    (["--num_image_per_class", "1"], "an anchor needs a positive"),
    (["--lr-decay-gamma", "-3"], "--lr-decay-gamma -3.0: must be in (0, 1]"),
    (["--intra_lamda", "5"], "--allow-unusual"),
    (["--beta", "-5"], "--beta -5"),
    (["--gamma", "2"], "--gamma 2.0: must be in [0, 1]"),
    (["--momentum", "1.5"], "--momentum 1.5"),
    (["--weight_decay", "-1"], "--weight_decay -1.0"),
    (["--image-size", "300"], "--image-size 300: must be between 1 and --resize-size"),
    (["--aug_num", "50"], "--aug_num 50"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_settings_that_cannot_learn_are_refused(capsys, data, tmp_path, flags, needle):
    assert_one_line_error(*run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path, *flags), needle)
    assert not (tmp_path / "kanji_efficientnet_lite0_ms_iaa_s0").exists()  # refused before anything was made


def test_unusual_lambda_passes_with_allow_unusual(data, tmp_path):
    cfg = flags.config_from_args(cli.build_parser().parse_args(
        ["train", *TINY, "--data", str(data), "--intra_lamda", "5", "--allow-unusual"]))
    assert cfg.iaa.intra_lamda == 5.0


@pytest.mark.parametrize("flags, needle", [
    (["--device", "tpu"], "--device 'tpu': not a device"),
    (["--device", "cuda:0"], "--device cuda:0: no CUDA device is visible"),
    (["--cache", "device"], "--cache device keeps images in GPU memory"),
    (["--kernels", "triton"], "--kernels triton runs on CUDA devices, not on cpu"),
])
def test_devices_that_are_not_there(capsys, data, tmp_path, flags, needle):
    if "cuda" in flags[-1] and torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    assert_one_line_error(*run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path, "--device", "cpu", *flags),
                   needle)


@pytest.mark.parametrize("argv, needle", [
    (["train", "--batch", "x"], "fastiaa train: error: argument --batch: invalid positive int value: 'x'"),
    (["nosuch"], "fastiaa: error: argument command: invalid choice: 'nosuch'"),
    (["index", "build", "--out", "x.index"], "fastiaa index build: error: the following arguments are required"),
])
def test_command_line_errors_are_one_line_naming_the_help(capsys, argv, needle):
    with pytest.raises(SystemExit) as stop:
        cli.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and err.startswith(needle), err
    assert err.rstrip().endswith("--help)")


@pytest.mark.parametrize("argv", [["--debug", "eval"], ["eval", "--debug"]], ids=["before", "after"])
def test_debug_shows_the_traceback_before_or_after_the_command(tmp_path, argv):
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        cli.main([*argv, "--checkpoint", str(tmp_path / "none.pt")])
    with pytest.raises(FileNotFoundError, match="fastiaa embed --out"):   # a command two levels down
        cli.main(["index", "build", "--debug", "--embeddings", str(tmp_path / "e.npy"), "--out", str(tmp_path / "i")])


# ---------------------------------------------------------------- data that is missing or broken

@pytest.mark.parametrize("dataset, needle", [
    ("cub200", "CUB_200_2011"), ("cars196", "Cars196"), ("stanford", "Stanford_Online_Products"),
    ("inshop", "In_Shop"), ("kanji", "fastiaa data kanji"),
])
def test_missing_dataset_names_the_layout(capsys, tmp_path, dataset, needle):
    assert_one_line_error(*run_cli(capsys, "train", "--dataset", dataset, "--data", tmp_path / "none", "--save-dir",
                            tmp_path), needle)


@pytest.mark.parametrize("damage, needle", [
    ("header", "header line is"),
    ("class id", "class_id"),
    ("missing column", "Ebay_train.txt"),
])
def test_malformed_list_file_names_the_file_and_line(capsys, data, tmp_path, damage, needle):
    listing = data / "Ebay_train.txt"
    lines = listing.read_text().splitlines()
    if damage == "header":
        lines[0] = "id class path"
    elif damage == "class id":
        lines[5] = lines[5].replace(lines[5].split()[1], "x7", 1)
    else:
        lines[3] = " ".join(lines[3].split()[:2])
    listing.write_text("\n".join(lines) + "\n")
    assert_one_line_error(*run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path), needle)


@pytest.mark.parametrize("cache", ["off", "ram"])
def test_every_unreadable_image_is_listed_before_training(capsys, data, tmp_path, cache):
    """A missing file, a non-image and a truncated JPEG among the train and test images: listed at once,
    with the command that finds them all, before any epoch (with the cache: found by its decode pass;
    without it: by the header check, which finds the missing and the non-image files)."""
    train = [line.split()[-1] for line in (data / "Ebay_train.txt").read_text().splitlines()[1:]]
    test = [line.split()[-1] for line in (data / "Ebay_test.txt").read_text().splitlines()[1:]]
    (data / train[3]).unlink()
    (data / test[7]).write_bytes(b"not an image at all")
    blob = (data / train[11]).read_bytes()
    (data / train[11]).write_bytes(blob[: len(blob) // 3])
    code, err = run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path, "--cache", cache)
    assert_one_line_error(code, err, "cannot be read", train[3].split("/")[-2], test[7].split("/")[-2],
                   f"fastiaa data check --dataset kanji --data {data}")
    if cache == "ram":
        assert train[11].split("/")[-2] in err and "3 image(s)" in err
    assert not (tmp_path / "kanji_efficientnet_lite0_ms_iaa_s0" / "metrics.jsonl").exists()


# ---------------------------------------------------------------- outputs

def test_folder_of_a_run_killed_before_its_first_record_is_not_taken_over(capsys, data, tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "config.json").write_text("{}")   # written at the start; the run died before its epoch-0 record
    assert_one_line_error(*run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path, "--name", "r"),
                          "already holds a run", "pass --resume")
    assert (run / "config.json").read_text() == "{}"


def test_refused_run_leaves_no_folder(capsys, tmp_path):
    assert_one_line_error(*run_cli(capsys, "train", "--dataset", "kanji", "--data", tmp_path / "none", "--save-dir",
                                   tmp_path / "runs"), "fastiaa data kanji")
    assert not (tmp_path / "runs").exists()


def test_save_dir_that_is_a_file(capsys, data, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(*run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path / "file"),
                   "is a file, not a folder", "--save-dir must name a folder")


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (room for the records, not for a checkpoint), or a skip where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a small file system here")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def test_full_disk_gives_one_line_and_loses_nothing(capsys, data, small_disk):
    code, err = run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", small_disk, "--name", "run")
    assert_one_line_error(code, err, "no space left on the device", "nothing already written was lost")
    run = small_disk / "run"
    assert [r["epoch"] for r in records(run)] == [0, 1]   # the records written before the first checkpoint
    assert not list(run.glob(".*")) and not (run / "last.pt").exists()  # no partial file anywhere


def test_read_only_disk_is_refused_before_training(capsys, data, small_disk):
    assert subprocess.run(["mount", "-o", "remount,ro", str(small_disk)]).returncode == 0
    assert_one_line_error(*run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", small_disk),
                   "cannot write there", "choose a writable --save-dir")


# ---------------------------------------------------------------- NaN, resume, records

def test_nan_from_a_huge_learning_rate_stops_and_keeps_no_nan(capsys, data, tmp_path):
    code, err = run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path, "--name", "nan",
                        "--lr", "1e30", "--head-lr-mult", "1e5", "--intra", "0")  # the head's outputs overflow
    assert_one_line_error(code, err, "non-finite", "epoch 1")
    last = tmp_path / "nan" / "last.pt"
    assert not last.exists() or all(torch.isfinite(v).all() for v in torch.load(last, weights_only=False)["model"].values())


def test_resume_with_other_settings_is_refused_with_the_list(capsys, data, tmp_path):
    base = ["train", *TINY, "--data", data, "--save-dir", tmp_path, "--name", "r", "--epochs", "1", "--intra", "0"]
    assert run_cli(capsys, *base)[0] == 0
    code, err = run_cli(capsys, *base, "--resume", "--lr", "1e-3", "--beta", "0.2")
    assert_one_line_error(code, err, "--lr 5e-05 -> 0.001", "--beta 0.1 -> 0.2")
    assert run_cli(capsys, *base, "--resume", "--workers", "2", "--log-every", "1")[0] == 0  # how it runs may change


def test_resumed_run_killed_before_its_first_checkpoint_never_repeats_an_epoch(capsys, data, tmp_path):
    run = tmp_path / "k"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"epoch": 0, "recall@1": 0.1}\n{"epoch": 1, "loss": 1.0}\n')
    (run / ".last.pt.x1y2z3").write_bytes(b"half a checkpoint")   # an interrupted write
    code, err = run_cli(capsys, "train", *TINY, "--data", data, "--save-dir", tmp_path, "--name", "k", "--resume")
    assert code == 0, err
    assert [r["epoch"] for r in records(run)] == [0, 1, 2] and not (run / ".last.pt.x1y2z3").exists()


def test_eval_on_wrong_checkpoints(capsys, tmp_path):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    for path, needle in ((tmp_path / "plain.pt", "not a checkpoint written by `fastiaa train`"),
                         (tmp_path / "junk.pt", "not a checkpoint written by fastiaa"),
                         (tmp_path / "none.pt", "no checkpoint at")):
        assert_one_line_error(*run_cli(capsys, "eval", "--checkpoint", path), needle)


# ---------------------------------------------------------------- kills and the processes a run leaves

def _cli(data: Path, save: Path, *flags) -> list[str]:
    return [sys.executable, "-m", "fastiaa", "train", *TINY, "--data", str(data), "--save-dir", str(save), *flags]


def _descendants(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            if ppid == pid:
                out |= {int(entry.name)} | _descendants(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie holds nothing and only waits to be reaped


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_leaves_no_process_and_resumes_to_the_same_result(data, tmp_path, sig):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    flags = ("--workers", "2", "--cache", "off", "--iter-per-epoch", "4")
    straight = subprocess.run(_cli(data, tmp_path, "--name", "a", *flags), env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr[-2000:]
    proc = subprocess.Popen(_cli(data, tmp_path, "--name", "b", *flags), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run, deadline, seen = tmp_path / "b", time.monotonic() + 240, set()
    while time.monotonic() < deadline and proc.poll() is None:  # kill it inside epoch 1, workers running
        seen |= _descendants(proc.pid)
        if (run / "metrics.jsonl").is_file() and len(seen) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(sig)
    err = proc.communicate(timeout=60)[1]
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "terminated; a training run continues with --resume" in err, err[-2000:]
    time.sleep(3)
    assert seen and not [pid for pid in seen if _alive(pid)]  # workers, spawner and resource tracker are gone
    resumed = subprocess.run(_cli(data, tmp_path, "--name", "b", *flags, "--resume"), env=env, capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    drop = ("images_per_s", "train_s", "refresh_s", "eval_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / "b")] == \
           [{k: v for k, v in r.items() if k not in drop} for r in records(tmp_path / "a")]
