"""bench/gpu_check.sh can be trusted with a lent GPU's few minutes: it parses, is executable, does
nothing without CUDA, its stage caps fit each run's budget, what each device call carries fits the
transfer limit, and ``pytest -m gpu`` has a real test set to run."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.sh"
CARRY_LIMIT = 64 * 2**20  # bytes one device call may send: the working tree plus what it carries


def stage_caps() -> dict[str, int]:
    return {name: int(cap) for name, cap in re.findall(r"^stage (\w+) (\d+) ", SCRIPT.read_text(), re.M)}


def test_parses_is_executable_and_does_nothing_without_cuda(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert os.access(SCRIPT, os.X_OK)
    mode = subprocess.run(["git", "ls-files", "-s", str(SCRIPT)], cwd=REPO, capture_output=True, text=True).stdout
    assert not mode or mode.startswith("100755"), mode  # executable in the repository too
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # whatever this machine has
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().count("\n") == 0, done.stdout + done.stderr
    assert "no CUDA device" in done.stdout and not (tmp_path / "out").exists()


def test_stage_caps_fit_each_runs_budget():
    text = SCRIPT.read_text()
    caps = stage_caps()
    headline = re.search(r'STAGES="\$\{STAGES:-([^}]*)\}"', text).group(1).split()
    budget = int(re.search(r'BUDGET_S="\$\{BUDGET_S:-(\d+)\}"', text).group(1))
    assert set(headline) <= set(caps) and "dali" not in headline and "tests" in headline and "train" in headline
    assert sum(caps[s] for s in headline) + 10 <= budget, (caps, budget)
    timeout = int(re.search(r'run\(command="bash bench/gpu_check.sh", timeout_s=(\d+)\)', text).group(1))
    assert budget + 60 <= timeout <= 600  # the report and the stage kill margins fit the call
    dali = re.search(r"STAGES='([^']*)' BUDGET_S=(\d+) bash bench/gpu_check.sh\",", text)
    stages, dali_budget = dali.group(1).split(), int(dali.group(2))
    assert sum(caps[s] for s in stages) + 10 <= dali_budget


def _tree_bytes() -> int:
    """What every call sends: tracked files plus untracked files that git does not ignore."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((REPO / name).stat().st_size for name in listed if name and (REPO / name).is_file())


def test_every_call_fits_the_transfer_limit():
    tree = _tree_bytes()
    assert tree < 8 * 2**20, tree  # run 1 carries nothing else
    prepare = (REPO / "bench" / "prepare_gpu_wheels.sh").read_text()
    piece = int(re.search(r'PART_MIB="\$\{PART_MIB:-(\d+)\}"', prepare).group(1)) * 2**20
    fonts_and_manifest = 3 * 2**20  # fonts.tar.xz (about 2 MiB) and MANIFEST, carried with the last piece
    assert tree + piece + fonts_and_manifest <= CARRY_LIMIT
    carried = re.findall(r"carry=\[([^\]]*)\]", SCRIPT.read_text())
    assert carried and all(c.count("site.tar.xz") == 1 for c in carried)  # one piece per call


def test_pytest_collects_a_real_gpu_test_set():
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           str(REPO / "tests")], cwd=REPO, capture_output=True, text=True, timeout=300)
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    assert len(collected) >= 15, done.stdout[-2000:]
    files = {line.split("::")[0].split("/")[-1] for line in collected}
    assert {"test_kernels.py", "test_train.py", "test_evaluation.py", "test_pipelines.py"} <= files
