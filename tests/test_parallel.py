"""The worker pool every parallel stage uses: dead workers, interrupts, orphans, progress.

Every wait is bounded (an alarm for in-process pools, timeouts for subprocesses), so a
regression fails instead of hanging the suite.
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import psutil
import pytest
from conftest import REPO, make_msd

from segpipe import parallel
from segpipe.errors import EXIT_INTERRUPTED, EXIT_STATE, StateError
from segpipe.parallel import RemoteTraceback, default_num_workers, parallel_list, parallel_map, resolve_num_workers
from segpipe.progress import Progress, progress_mode

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="signals and prctl: Linux only")

HANG_LIMIT = 60  # seconds before a hung pool fails the test


# ---------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """Fail (not hang) when an in-process pool never returns."""

    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"the worker pool did not return within {HANG_LIMIT} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(HANG_LIMIT)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def _no_new_children(before: set[int]) -> None:
    new = [psutil.Process(pid) for pid in _children() - before if psutil.pid_exists(pid)]
    _, alive = psutil.wait_procs(new, timeout=10)
    assert not alive, f"worker processes survived: {alive}"


def _square(x: int) -> int:
    return x * x


def _kill_self_on_3(x: int) -> int:
    if x == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.02)
    return x


def _raise_on_2(x: int) -> int:
    if x == 2:
        raise ValueError("bad item 2")
    return x


class _TwoArgError(Exception):
    def __init__(self, a: str, b: str):
        super().__init__(f"{a}/{b}")


def _raise_unpicklable(x: int) -> int:
    raise _TwoArgError("left", "right")


def _sleep(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def _interval(seconds: float) -> tuple[float, float]:
    start = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process of the machine
    time.sleep(seconds)
    return start, time.monotonic()


# ---------------------------------------------------------------------------- the helper
def test_results_carry_their_index_and_list_keeps_input_order() -> None:
    before = _children()
    pairs = sorted(parallel_map(_square, range(10), num_workers=2))
    assert pairs == [(i, i * i) for i in range(10)]
    assert parallel_list(_square, range(10), num_workers=3) == [i * i for i in range(10)]
    assert parallel_list(_square, range(10), num_workers=1) == [i * i for i in range(10)]
    assert parallel_list(_square, [], num_workers=2) == []
    _no_new_children(before)


def test_at_most_num_workers_tasks_in_flight() -> None:
    intervals = parallel_list(_interval, [0.05] * 8, num_workers=2)
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda t: (t[0], t[1]))
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2


def test_a_killed_worker_is_a_one_line_state_error_naming_the_case() -> None:
    before = _children()
    with pytest.raises(StateError) as info:
        parallel_list(_kill_self_on_3, range(8), num_workers=2, names=lambda i: f"case c{i:02d}", context="/data/x")
    err = info.value
    assert err.exit_code == EXIT_STATE
    assert err.message.startswith("/data/x: a worker died (killed by SIGKILL, probably out of memory)")
    assert "case c03" in err.message and "\n" not in err.message
    assert err.hint is not None and "num_workers=1" in err.hint
    _no_new_children(before)


def test_a_worker_exception_is_reraised_with_its_traceback_and_the_pool_is_killed() -> None:
    before = _children()
    with pytest.raises(ValueError, match="bad item 2") as info:
        parallel_list(_raise_on_2, range(6), num_workers=2)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_raise_on_2" in str(info.value.__cause__)
    with pytest.raises(RuntimeError, match="_TwoArgError: left/right"):  # cannot be rebuilt here: described
        parallel_list(_raise_unpicklable, range(3), num_workers=2)
    _no_new_children(before)


def test_closing_the_iterator_early_kills_the_workers() -> None:
    before = _children()
    results = parallel_map(_sleep, [0.01, 0.01, 30.0, 30.0, 30.0], num_workers=2)
    with closing(results):
        next(results)
    _no_new_children(before)


def test_workers_ignore_sigint() -> None:
    before = _children()
    results = parallel_map(_sleep, [0.01] + [0.3] * 5, num_workers=2)
    with closing(results):
        got = [next(results)]
        for pid in _children() - before:
            os.kill(pid, signal.SIGINT)  # Ctrl-C reaches the whole process group; workers leave it to the parent
        got.extend(results)
    assert sorted(i for i, _ in got) == list(range(6))
    _no_new_children(before)


def test_keyboard_interrupt_in_the_parent_kills_the_workers_without_hanging() -> None:
    before = _children()
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            parallel_list(_sleep, [20.0] * 4, num_workers=2)
    finally:
        timer.cancel()
    _no_new_children(before)


WORKERS_OUTLIVE_PARENT = """
import sys, time
from segpipe import parallel
if sys.argv[1] == "watchdog":  # no prctl: only the watchdog thread notices the parent's death
    parallel._PR_SET_PDEATHSIG = 0
def nap(x):
    time.sleep(60)
print("started", flush=True)
parallel.parallel_list(nap, range(4), num_workers=2)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mechanism", ["prctl", "watchdog"])
def test_workers_die_with_their_parent(mechanism: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKERS_OUTLIVE_PARENT, mechanism], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        workers = _wait_for_workers(proc, 2)
    finally:
        proc.kill()  # kill -9 of the main process: no cleanup code runs there
        proc.wait(timeout=30)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"orphaned workers: {alive}"


def test_default_num_workers_respects_affinity_and_cgroup_quota(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(parallel, "_cgroup_cpu_limit", lambda: None)
    assert default_num_workers() == 8
    monkeypatch.setattr(parallel, "_cgroup_cpu_limit", lambda: 3)
    assert default_num_workers() == 3
    assert resolve_num_workers(None) == 3 and resolve_num_workers(0) == 3
    assert resolve_num_workers(5, 2) == 2 and resolve_num_workers(4) == 4

    monkeypatch.undo()
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert parallel._cgroup_cpu_limit(str(tmp_path)) == 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert parallel._cgroup_cpu_limit(str(tmp_path)) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert parallel._cgroup_cpu_limit(str(tmp_path)) == 4
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert parallel._cgroup_cpu_limit(str(tmp_path)) is None


def test_old_default_num_workers_names_are_aliases() -> None:
    fingerprint = importlib.import_module("segpipe.fingerprint")
    assert fingerprint.default_num_workers is default_num_workers


# ---------------------------------------------------------------------------- progress
class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_modes(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = logging.getLogger("segpipe")
    monkeypatch.setattr(logger, "level", logging.INFO)
    assert progress_mode(_Tty()) == "bar"
    assert progress_mode(io.StringIO()) == "log"
    monkeypatch.setattr(logger, "level", logging.WARNING)  # -q
    assert progress_mode(_Tty()) == "quiet"


def test_progress_bar_on_a_terminal() -> None:
    tty = _Tty()
    with Progress("fingerprint", 4, mode="bar", stream=tty) as bar:
        for _ in range(4):
            bar.update()
    text = tty.getvalue()
    assert text.startswith("\rfingerprint  [") and text.endswith("\n")
    assert "4/4 cases" in text.splitlines()[-1].split("\r")[-1]


def test_progress_log_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="segpipe")
    with Progress("preprocess 3d_fullres", 20, mode="log", min_interval=0.0) as bar:
        for _ in range(20):
            bar.update()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("preprocess 3d_fullres: 2/20 cases (10%)")
    assert 5 <= len(lines) <= 11  # about one per 10 %, and the last line
    assert lines[-1].startswith("preprocess 3d_fullres: 20/20 cases in ")
    caplog.clear()
    with Progress("check", 20, mode="log") as bar:  # a stage shorter than the first interval: silent
        for _ in range(20):
            bar.update()
    assert not caplog.records
    stream = io.StringIO()
    with Progress("check", 3, mode="quiet", stream=stream) as bar:
        bar.update(3)
    assert stream.getvalue() == ""


# ---------------------------------------------------------------------------- the stages
def _killed_in_workers(fn, parent: int):  # type: ignore[no-untyped-def]
    """``fn``, but a worker process that calls it SIGKILLs itself (as the out-of-memory killer would).

    Forked workers inherit the patched module; the parent (which may run the first case) is spared.
    """

    def killer(*args, **kwargs):  # type: ignore[no-untyped-def]
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return killer


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_msd(tmp_path_factory.mktemp("pool") / "ds", n=6)


def test_fingerprint_worker_killed_gives_the_one_line_error(
    small_dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.io.datasets import load_dataset

    fingerprint = importlib.import_module("segpipe.fingerprint")
    monkeypatch.setattr(fingerprint, "summarize_case", _killed_in_workers(fingerprint.summarize_case, os.getpid()))
    before = _children()
    with pytest.raises(StateError) as info:
        fingerprint.compute_fingerprint(load_dataset(small_dataset), num_workers=2)
    assert "a worker died (killed by SIGKILL, probably out of memory) on case case_" in info.value.message
    assert str(small_dataset) in info.value.message and "num_workers=1" in (info.value.hint or "")
    _no_new_children(before)


def test_check_worker_killed_gives_the_one_line_error(small_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check = importlib.import_module("segpipe.checks")
    monkeypatch.setattr(check, "_inspect_findings", _killed_in_workers(check._inspect_findings, os.getpid()))
    before = _children()
    with pytest.raises(StateError, match="a worker died .* on case case_"):
        check.check_dataset(small_dataset, num_workers=2)
    _no_new_children(before)


@pytest.mark.slow  # the parent imports torch for its workers
def test_preprocess_worker_killed_gives_the_one_line_error(
    small_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from segpipe.io.datasets import load_dataset
    from segpipe.preprocessing import ChannelNorm, PreprocessSpec

    stage = importlib.import_module("segpipe.preprocessing.dataset")
    monkeypatch.setattr(stage, "preprocess_arrays", _killed_in_workers(stage.preprocess_arrays, os.getpid()))
    before = _children()
    spec = PreprocessSpec(spacing=(2.5, 0.8, 0.8), normalization=(ChannelNorm("zscore"),))
    with pytest.raises(StateError, match="a worker died .* on case case_") as info:
        stage.preprocess_dataset(load_dataset(small_dataset), spec, tmp_path / "cache", num_workers=2)
    assert "num_workers=1" in (info.value.hint or "")
    _no_new_children(before)


# ---------------------------------------------------------------------------- the CLI, in a subprocess
# Slows every case down (in the parent and, inherited through fork, in the workers) so that the
# test can interrupt or kill a stage while its workers run; then runs the CLI.
SLOW_CLI = """
import importlib, sys, time
def slow(module, name):
    mod = importlib.import_module(module)
    fn = getattr(mod, name, None)
    if fn is None:
        return
    def slowed(*args, **kwargs):
        time.sleep(0.4)
        return fn(*args, **kwargs)
    setattr(mod, name, slowed)
slow("segpipe.fingerprint", "summarize_case")
slow("segpipe.checks", "_inspect_findings")
slow("segpipe.preprocessing.dataset", "preprocess_arrays")
from segpipe.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _wait_for_workers(proc: subprocess.Popen, n: int) -> list[psutil.Process]:
    parent = psutil.Process(proc.pid)
    t0 = time.monotonic()
    while time.monotonic() - t0 < HANG_LIMIT:
        if proc.poll() is not None:
            pytest.fail(f"the command ended (exit {proc.returncode}) before its workers started")
        kids = parent.children(recursive=True)
        if len(kids) >= n:
            time.sleep(0.2)  # let them start on their cases
            return kids
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {n} worker processes after {HANG_LIMIT} s")


def _slow_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_CLI, *args],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_during_plan_exits_130_with_one_line_and_no_survivors(
    demo_dataset: Path, tmp_path: Path, attempt: int
) -> None:
    proc = _slow_cli("plan", str(demo_dataset), f"work_dir={tmp_path / 'work'}", "num_workers=2", "-q")
    try:
        workers = _wait_for_workers(proc, 2)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole process group
        _, err = proc.communicate(timeout=HANG_LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert len(lines) == 1 and "interrupted" in lines[0] and lines[0].startswith("segpipe plan"), err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers survived Ctrl-C: {alive}"


@pytest.mark.slow
def test_plan_with_a_killed_worker_exits_4_with_the_fix(demo_dataset: Path, tmp_path: Path) -> None:
    proc = _slow_cli("plan", str(demo_dataset), f"work_dir={tmp_path / 'work'}", "num_workers=2", "-q")
    try:
        workers = _wait_for_workers(proc, 2)
        workers[0].kill()  # as the out-of-memory killer would
        _, err = proc.communicate(timeout=HANG_LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == EXIT_STATE, err
    assert "a worker died (killed by SIGKILL, probably out of memory) on case" in lines[0], err
    assert "Traceback" not in err and "num_workers=1" in err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


@pytest.fixture(scope="module")
def planned_demo(demo_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    import segpipe

    work = tmp_path_factory.mktemp("planned") / "work"
    segpipe.plan(demo_dataset, work_dir=work, num_workers=1)
    return demo_dataset, work


@pytest.mark.slow
def test_ctrl_c_during_preprocess_exits_130_without_worker_tracebacks(planned_demo: tuple[Path, Path]) -> None:
    dataset, work = planned_demo
    proc = _slow_cli("preprocess", str(dataset), f"work_dir={work}", "num_workers=2", "force=true", "-q")
    try:
        workers = _wait_for_workers(proc, 2)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=HANG_LIMIT)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert len(lines) == 1 and "interrupted" in lines[0], err
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"workers survived Ctrl-C: {alive}"


@pytest.mark.slow
def test_kill_9_of_preprocess_leaves_no_orphan_workers(planned_demo: tuple[Path, Path]) -> None:
    dataset, work = planned_demo
    proc = _slow_cli("preprocess", str(dataset), f"work_dir={work}", "num_workers=2", "force=true", "-q")
    try:
        workers = _wait_for_workers(proc, 2)
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    _, alive = psutil.wait_procs(workers, timeout=15)
    assert not alive, f"orphaned preprocessing workers: {alive}"


def test_no_torch_in_check_and_plan() -> None:
    """fork: workers inherit the parent's modules, so a parent without torch keeps them light."""
    code = textwrap.dedent("""
        import sys
        import segpipe.cli, segpipe.api, segpipe.config, segpipe.checks, segpipe.fingerprint, segpipe.parallel
        import segpipe.planning, segpipe.preprocessing
        print(sorted(m for m in ("torch", "lightning", "monai") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=HANG_LIMIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
