"""Reliability: faults during `segpipe train`, run as subprocesses like a pipeline runs them.

`kill -9` mid-epoch and a damaged last checkpoint, each followed by the same command again: the
run ends with the epoch count and the weights, bit for bit, of a run that met no fault
(``deterministic=true`` on the CPU).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO

CONFIG = "3d_fullres"
#: tiny training: 3 epochs of 2 iterations; 20 validation patch batches make each epoch last long enough
#: (about half a second) for the kill to land inside one
TRAIN = ["epochs=3", "iterations_per_epoch=2", "val_batches=20", "num_workers=0", "deterministic=true", "seed=7"]
TIMEOUT = 120  # seconds for any one command
#: one thread each: the same arithmetic in every process, and the shared cores stay free
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(work: Path) -> list[str]:
    return [sys.executable, "-m", "segpipe", "train", f"work_dir={work}", *TRAIN]


def train(work: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        train_command(work),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, **ENV},
        timeout=TIMEOUT,
    )


def saved_epoch(last: Path) -> int | None:
    """The completed epochs in ``last.pt`` as a reader outside the run sees them (None before the first)."""
    if not last.is_file():
        return None
    return int(torch.load(last, weights_only=True)["epoch"])


def model_state(run_dir: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run_dir / "final.pt", weights_only=True)["model"]
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    return state


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo dataset (12 cases) planned coarsely (6×3×3 mm, 4-16 features: a 12×24×28 patch) and
    preprocessed, in two identical workspaces."""
    import segpipe

    root = tmp_path_factory.mktemp("train_cli")
    data = segpipe.generate_demo_data(root / "demo")
    first = root / "work_a"
    segpipe.plan(
        data,
        work_dir=first,
        configurations=[CONFIG],
        target_spacing=[6.0, 3.0, 3.0],
        base_features=4,
        max_features_3d=16,
        num_workers=1,
    )
    segpipe.preprocess(data, work_dir=first, num_workers=1)
    second = root / "work_b"
    shutil.copytree(first, second)
    return first, second


@pytest.fixture(scope="module")
def uninterrupted(workspaces: tuple[Path, Path]) -> Path:
    """The reference: the first workspace's fold 0 trained once without a fault (its run folder)."""
    r = train(workspaces[0])
    assert r.returncode == 0, r.stderr
    assert "finished after 3 of 3 epochs" in r.stdout
    assert "final validation after epoch 3: mean foreground Dice" in r.stderr
    return workspaces[0] / "demo" / "runs" / CONFIG / "fold_0"


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = model_state(run_a), model_state(run_b)
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ from the uninterrupted run: {different[:5]}"


@pytest.mark.slow
def test_kill_9_mid_epoch_then_the_same_command_resumes_bit_identically(
    workspaces: tuple[Path, Path], uninterrupted: Path
) -> None:
    """`kill -9` of `train` inside epoch 2 of 3, then the same command: it resumes after epoch 1 and ends bit-identical
    to a run never interrupted (`deterministic=true`, CPU); a third call trains nothing."""
    killed = workspaces[1]
    run_a = uninterrupted
    run_b = killed / "demo" / "runs" / CONFIG / "fold_0"

    # the same command in the other workspace, killed with SIGKILL once epoch 1 is saved
    output = (killed / "killed_run.log").open("w")
    proc = subprocess.Popen(
        train_command(killed), cwd=REPO, env={**os.environ, **ENV}, stdout=output, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while saved_epoch(run_b / "last.pt") is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        # stop it at once (it is now inside epoch 2), then look again: the kill lands mid-epoch
        proc.send_signal(signal.SIGSTOP)
        assert saved_epoch(run_b / "last.pt") == 1, "the run did not stop inside epoch 2"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        output.close()
    assert proc.returncode == -signal.SIGKILL, (killed / "killed_run.log").read_text()
    assert not (run_b / "final.pt").exists()

    # the same command again resumes after epoch 1 and finishes
    r = train(killed)
    assert r.returncode == 0, r.stderr
    assert "resuming after epoch 1" in r.stderr
    assert "epoch 2/3" in r.stderr and "epoch 3/3" in r.stderr and "epoch 1/3" not in r.stderr
    assert "finished after 3 of 3 epochs" in r.stdout
    assert_same_weights(run_a, run_b)
    assert (run_b / "progress.png").is_file() and (run_b / "validation" / "summary.json").is_file()

    # a third time: the run has finished, nothing is trained
    stamp = (run_b / "last.pt").stat().st_mtime_ns
    r = train(killed)
    assert r.returncode == 0, r.stderr
    assert "this run has finished (3 epochs)" in r.stderr and "already finished" in r.stdout
    assert "epoch " not in r.stderr.replace("(3 epochs)", "")
    assert (run_b / "last.pt").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_a_truncated_last_checkpoint_is_never_loaded_and_the_run_is_rebuilt_from_the_one_before(
    uninterrupted: Path, tmp_path: Path
) -> None:
    """A `last.pt` truncated by hand is refused as damaged, never loaded: `train` resumes from `last.prev.pt`,
    trains the lost epoch again and ends bit-identical to the run before the damage."""
    work = tmp_path / "work_c"
    shutil.copytree(uninterrupted.parents[3], work)
    run = work / "demo" / "runs" / CONFIG / "fold_0"
    last = run / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    (run / "final.pt").unlink()
    r = train(work)
    assert r.returncode == 0, r.stderr
    assert "truncated or damaged" in r.stderr and "resuming from last.prev.pt (epoch 2)" in r.stderr, r.stderr
    assert "epoch 3/3" in r.stderr and "epoch 2/3" not in r.stderr
    assert saved_epoch(last) == 3 and saved_epoch(run / "last.prev.pt") == 2
    assert_same_weights(uninterrupted, run)
    # both checkpoints damaged: one clear error, nothing trained from scratch behind the user's back
    for name in ("last.pt", "last.prev.pt"):
        (run / name).write_bytes(b"PK\x03\x04 damaged")
    r = train(work)
    assert r.returncode != 0 and "last.prev.pt is truncated or damaged" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and "overwrite=true" in r.stderr
