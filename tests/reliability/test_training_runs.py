"""Reliability: what `segpipe train` does with a run folder over its life, run as subprocesses like a
pipeline or a scheduler runs them.

A run asked for more epochs, two trainings of one run at once, SIGTERM and Ctrl-C in the middle of
an epoch (and to a busy worker pool), far more workers than cores, and short epochs. The trainings
are of a tiny network (4-16 features, a 12×24×28 patch), a few iterations on five synthetic cases.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import REPO

CONFIG = "3d_fullres"
DATASET = "Runs"
TIMEOUT = 120  # seconds for any one command
#: one thread each: the same arithmetic in every process, and the shared cores stay free
ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
#: a few iterations of the tiny network, no loader workers unless a test asks for them
TINY = ["iterations_per_epoch=2", "val_batches=1", "num_workers=0", "seed=3"]


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Five synthetic cases planned coarsely (6×3×3 mm, 4-16 features) and preprocessed: a workspace."""
    import segpipe
    from segpipe.demo_data import generate_demo_dataset

    root = tmp_path_factory.mktemp("train_runs")
    data = generate_demo_dataset(root / DATASET, num_cases=5, num_test=0)
    work = root / "work"
    settings = {"target_spacing": [6.0, 3.0, 3.0], "base_features": 4, "max_features_3d": 16, "num_workers": 1}
    segpipe.plan(data, work_dir=work, configurations=[CONFIG], **settings)
    segpipe.preprocess(data, work_dir=work, num_workers=1)
    return work


@pytest.fixture
def work(planned: Path, tmp_path: Path) -> Path:
    """A copy of the planned workspace for one test."""
    return Path(shutil.copytree(planned, tmp_path / "work"))


def run_dir(work: Path, fold: str) -> Path:
    return work / DATASET / "runs" / CONFIG / f"fold_{fold}"


def command(work: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "segpipe", "train", f"work_dir={work}", *args]


def train(work: Path, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command(work, *args), capture_output=True, text=True, cwd=REPO, env={**os.environ, **ENV}, timeout=timeout
    )


def start(work: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """`segpipe train` in the background, in a process group of its own (as a shell starts a job)."""
    return subprocess.Popen(
        command(work, *args),
        cwd=REPO,
        env={**os.environ, **ENV},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def saved(last: Path) -> dict | None:
    """``last.pt`` as a reader outside the run sees it (None before the first save)."""
    if not last.is_file():
        return None
    try:
        return torch.load(last, weights_only=True)
    except Exception:  # being replaced right now
        return None


def inside(run: Path, epoch: int) -> bool:
    """Whether ``last.pt`` holds a state saved inside epoch ``epoch + 1``, after ``epoch`` completed ones."""
    state = saved(run / "last.pt") or {}
    return state.get("epoch") == epoch and state.get("data", {}).get("in_epoch", 0) >= 1


def wait_for(condition, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"the training ended before {what}:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{log.read_text()}"
        time.sleep(0.02)


def settings_json(run: Path) -> dict:
    return json.loads((run / "settings.json").read_text())["settings"]


def lrs(run: Path) -> list[float]:
    rows = (run / "metrics.csv").read_text().splitlines()
    column = rows[0].split(",").index("lr")
    return [float(r.split(",")[column]) for r in rows[1:]]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("segpipe train: error")]


def test_more_epochs_continue_a_finished_run_over_a_respanned_schedule_and_fewer_are_refused(work: Path) -> None:
    """`train epochs=3` after a finished 1-epoch run trains epochs 2 and 3 with the poly schedule over 3 epochs, and
    settings.json says 3; `epochs=2` then is refused (exit 2) with the fix `--overwrite`, changing nothing.
    """
    run = run_dir(work, "all")
    first = train(work, "fold=all", "epochs=1", *TINY)
    assert first.returncode == 0, first.stderr
    assert "finished after 1 of 1 epochs" in first.stdout

    more = train(work, "fold=all", "epochs=3", *TINY)
    assert more.returncode == 0, more.stderr
    assert "finished after 3 of 3 epochs" in more.stdout and "already finished" not in more.stdout
    assert "continuing after epoch 1 to 3 epochs" in more.stderr, more.stderr
    assert "epoch 2/3" in more.stderr and "epoch 3/3" in more.stderr and "epoch 1/3" not in more.stderr
    assert settings_json(run)["epochs"] == 3
    # epoch 1 ran under the 1-epoch schedule; from epoch 2 on the poly schedule spans 3 epochs
    assert lrs(run) == pytest.approx([0.01, 0.01 * (1 - 1 / 3) ** 0.9, 0.01 * (1 - 2 / 3) ** 0.9], rel=1e-5)
    assert (run / "final.pt").is_file() and saved(run / "last.pt")["finished"]

    stamp = (run / "last.pt").stat().st_mtime_ns
    fewer = train(work, "fold=all", "epochs=2", *TINY)
    assert fewer.returncode == 2, fewer.stderr
    (line,) = error_lines(fewer.stderr)
    assert "epochs=2" in line and "3 epochs" in line, fewer.stderr
    assert "--overwrite" in fewer.stderr and "Traceback" not in fewer.stderr
    assert settings_json(run)["epochs"] == 3 and (run / "last.pt").stat().st_mtime_ns == stamp


def test_an_interrupted_run_asked_for_more_epochs_resumes_and_trains_to_the_new_count(work: Path) -> None:
    """An `epochs=3` run stopped by SIGTERM inside epoch 3, then `epochs=4`: it resumes inside epoch 3, ends after
    4 of 4 epochs with the schedule over 4 from there, and settings.json says 4."""
    run = run_dir(work, "all")
    log = work / "stopped.log"
    args = ("fold=all", "iterations_per_epoch=20", "val_batches=1", "num_workers=0", "checkpoint_every=0.001s")
    proc = start(work, log, "epochs=3", *args)
    try:
        wait_for(lambda: inside(run, 2), proc, log, "a save inside epoch 3")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 143, log.read_text()
    state = saved(run / "last.pt")
    assert state is not None and state["epoch"] == 2 and state["data"]["in_epoch"] >= 1
    assert settings_json(run)["epochs"] == 3

    more = train(work, "epochs=4", *args)
    assert more.returncode == 0, more.stderr
    assert "finished after 4 of 4 epochs" in more.stdout
    assert "continuing after epoch 2 to 4 epochs" in more.stderr, more.stderr
    assert settings_json(run)["epochs"] == 4
    assert lrs(run)[-1] == pytest.approx(0.01 * (1 - 3 / 4) ** 0.9, rel=1e-5)


def test_a_second_training_of_one_run_fails_at_once_naming_the_first_and_the_lock_dies_with_it(work: Path) -> None:
    """While `train fold=0` runs, the same command fails at once (exit 4) naming the running one's command and pid,
    touching nothing; after a `kill -9` of the first, the run folder is free again."""
    run = run_dir(work, "0")
    log = work / "first.log"
    args = ("fold=0", "epochs=1", "iterations_per_epoch=2000", "val_batches=1", "num_workers=0")
    first = start(work, log, *args)
    try:
        wait_for(lambda: (run / "settings.json").is_file(), first, log, "the run to start")
        before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        second = train(work, *args, "--overwrite", timeout=60)  # refused at once, not after training
        assert second.returncode == 4, second.stderr
        (line,) = error_lines(second.stderr)
        assert "segpipe train" in line.split("error:", 1)[1] and f"process {first.pid}" in line, second.stderr
        assert "fix:" in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None, "the first training stopped"
        assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    finally:
        first.kill()
        first.wait(timeout=30)
    again = train(work, "fold=0", "epochs=1", *TINY, "--overwrite")
    assert again.returncode == 0, again.stderr
    assert "finished after 1 of 1 epochs" in again.stdout


def _signal_mid_epoch(work: Path, signum: signal.Signals, *, group: bool) -> tuple[int, str, float, list]:
    """Start a 2-epoch training with one loader worker, send ``signum`` once it is inside epoch 2 (to the
    process group, as a terminal's Ctrl-C, with ``group``); its exit code, output, seconds to exit and workers."""
    run = run_dir(work, "all")
    log = work / f"{signum.name}.log"
    proc = start(work, log, "fold=all", *ARGS_SIGNALS)
    try:
        wait_for(lambda: inside(run, 1), proc, log, "a save inside epoch 2")
        workers = psutil.Process(proc.pid).children(recursive=True)
        sent = time.monotonic()
        if group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        proc.wait(timeout=60)
        seconds = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    return proc.returncode, log.read_text(), seconds, workers


#: 2 epochs of 30 iterations with one persistent loader worker (a process of its own), saved after every
#: iteration so that the test sees when the run is inside epoch 2
ARGS_SIGNALS = ("epochs=2", "iterations_per_epoch=30", "val_batches=1", "num_workers=1", "checkpoint_every=0.001s")


def _check_saved_inside_epoch_2(work: Path, output: str, workers: list) -> None:
    assert len(error_lines(output)) == 1 and "Traceback" not in output, output
    assert workers, "the training had no loader worker"
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"loader workers left running: {alive}"
    state = saved(run_dir(work, "all") / "last.pt")
    assert state is not None and state["epoch"] == 1 and state["data"]["in_epoch"] >= 2 and not state["finished"]
    again = train(work, "fold=all", *ARGS_SIGNALS)
    assert again.returncode == 0, again.stderr
    assert f"resuming after epoch 1, inside epoch 2 at iteration {state['data']['in_epoch']}" in again.stderr
    assert "finished after 2 of 2 epochs" in again.stdout


def test_sigterm_mid_epoch_saves_the_epoch_in_progress_says_so_and_exits_143_then_the_run_resumes(
    work: Path,
) -> None:
    """SIGTERM to `train` and its loader workers inside epoch 2 saves the epoch so far, prints one line and exits 143
    within seconds, leaving no worker; the same command resumes inside that epoch."""
    code, output, seconds, workers = _signal_mid_epoch(work, signal.SIGTERM, group=True)
    assert code == 143, output
    assert "stopped by SIGTERM in epoch 2, iteration" in output and "the same command resumes" in output, output
    assert seconds < 20, f"{seconds:.1f} s from SIGTERM to exit"
    _check_saved_inside_epoch_2(work, output, workers)


def test_ctrl_c_to_the_process_group_saves_the_epoch_in_progress_and_exits_130_then_the_run_resumes(
    work: Path,
) -> None:
    """Ctrl-C (SIGINT to the process group) inside epoch 2 saves the epoch so far, prints one line and exits 130,
    leaving no worker; the same command resumes inside that epoch."""
    code, output, seconds, workers = _signal_mid_epoch(work, signal.SIGINT, group=True)
    assert code == 130, output
    assert "stopped by Ctrl-C (SIGINT) in epoch 2, iteration" in output, output
    assert seconds < 20, f"{seconds:.1f} s from Ctrl-C to exit"
    _check_saved_inside_epoch_2(work, output, workers)


#: a program whose worker pool sleeps: ``stop`` makes SIGTERM end it cleanly (exit 143), else it dies of it
POOL_PROGRAM = """
import signal, sys, time
from segpipe import parallel

def nap(x):
    time.sleep(60)
    return x

if sys.argv[1] == "stop":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
parallel.parallel_list(nap, range(8), num_workers=2)
"""


@pytest.mark.parametrize("parent", ["stop", "default"])
def test_sigterm_to_a_process_group_ends_its_worker_pool_at_once_leaving_no_worker(parent: str) -> None:
    """SIGTERM to a process group whose worker pool is busy ends the process at once (exit 143 when it stops on
    SIGTERM, killed by it otherwise), and no worker outlives it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", POOL_PROGRAM, parent],
        cwd=REPO,
        env={**os.environ, **ENV},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(psutil.Process(proc.pid).children()) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.02)
        workers = psutil.Process(proc.pid).children()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert proc.returncode == (143 if parent == "stop" else -signal.SIGTERM), err
    assert "Traceback" not in err and "worker died" not in err, err
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert not alive, f"workers left running: {alive}"


def _pid_after_a_nap(_: int) -> int:
    time.sleep(0.05)
    return os.getpid()


def test_num_workers_beyond_the_usable_cores_is_capped_with_one_warning(
    planned: Path, work: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`num_workers=1000` runs at most one worker per usable core (the worker pool and the training loader), says so
    in one warning line, and settings.json records the workers used."""
    from segpipe import parallel
    from segpipe.data import SegDataModule
    from segpipe.planning import load_plan

    cores = parallel.default_num_workers()
    assert cores <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(parallel, "_capped", set())  # the warning is said once per process
    caplog.set_level(logging.WARNING, logger="segpipe")
    pids = set(parallel.parallel_list(_pid_after_a_nap, range(24), num_workers=1000))
    assert len(pids) <= cores
    plan = load_plan(planned / DATASET / "plans.json")
    dm = SegDataModule.from_plan(plan, CONFIG, "all", work_dir=planned, dataset=DATASET, num_workers=1000)
    assert dm.num_workers == cores and dm.train_dataloader().num_workers == cores
    warned = [r.getMessage() for r in caplog.records if "num_workers=1000" in r.getMessage()]
    assert len(warned) == 1 and f"{cores} usable" in warned[0], warned

    r = train(work, "fold=all", "epochs=1", "iterations_per_epoch=2", "val_batches=1", "num_workers=1000")
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if "num_workers=1000" in line]
    assert len(warnings) == 1 and warnings[0].startswith("segpipe train: warning:"), r.stderr
    assert settings_json(run_dir(work, "all"))["num_workers"] == cores


def test_a_short_epoch_validates_on_a_fifth_as_many_patch_batches_unless_val_batches_is_given(work: Path) -> None:
    """Without `val_batches`, an epoch validates on one patch batch per 5 training iterations (rounded up, at most
    nnU-Net's 50): 10 iterations validate on 2 batches; an explicit `val_batches` still wins."""
    from segpipe.config import compose_config
    from segpipe.training.run_settings import train_settings

    assert compose_config([], command="train").train.val_batches is None
    scaled = {n: train_settings({"iterations_per_epoch": n})["val_batches"] for n in (1, 5, 10, 12, 250, 1000)}
    assert scaled == {1: 1, 5: 1, 10: 2, 12: 3, 250: 50, 1000: 50}
    assert train_settings({"iterations_per_epoch": 10, "val_batches": 7})["val_batches"] == 7

    r = train(work, "fold=all", "epochs=1", "iterations_per_epoch=10", "num_workers=0")
    assert r.returncode == 0, r.stderr
    assert settings_json(run_dir(work, "all"))["val_batches"] == 2
    given = train(
        work, "fold=all", "epochs=1", "iterations_per_epoch=10", "val_batches=3", "num_workers=0", "--overwrite"
    )
    assert given.returncode == 0, given.stderr
    assert settings_json(run_dir(work, "all"))["val_batches"] == 3
