"""One worker pool for every parallel stage (fingerprint, check, preprocess).

Why not ``multiprocessing.Pool`` or ``ProcessPoolExecutor``: a worker killed by the
out-of-memory killer leaves ``Pool.imap`` waiting forever, ``Pool.terminate()`` can hang on
Ctrl-C, and neither kills its workers when the main process is killed. Here the parent owns
each worker and its pipe directly:

* **Bounded memory.** Each worker holds exactly one task at a time, so at most ``num_workers``
  cases are in RAM; the parent keeps only the small task descriptions and the results.
* **A dead worker is an error, at once.** The parent waits on the workers' pipes *and* their
  process sentinels, so a worker that dies (SIGKILL, segfault) raises a one-line
  :class:`~segpipe.errors.StateError` naming the case it was on, with the fix (fewer workers).
* **Interrupts.** Signals are the parent's to handle (:func:`worker_signals`): workers ignore
  SIGINT and SIGUSR1 (Ctrl-C reaches the whole process group; the parent alone turns it into
  ``KeyboardInterrupt``), and a SIGTERM sent to the whole group or job ends a worker only when it
  comes from its parent, so no worker dies first or prints a traceback. On interrupt, SIGTERM,
  error or worker death the parent SIGKILLs the remaining workers explicitly and joins them with
  a timeout: nothing waits on a worker that will not answer. Both signals are blocked only while
  one worker is forked, so either stops the spawning of a large pool at once.
* **At most one worker per usable core** (:func:`cap_num_workers`): a larger ``num_workers`` is
  lowered to the core count with one warning line, since more processes than cores add only
  memory (each holds its own cases or batches).
* **Workers die with their parent**: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` on Linux, plus a
  watchdog thread that exits when the parent pid changes (other systems, and the window
  before ``prctl`` took effect).
* **fork where available** (as torch's DataLoader): workers start at once, share the parent's
  imported modules, and the caller's ``__main__`` is not re-imported, so scripts, notebooks and
  stdin need no ``if __name__ == "__main__"`` guard. Elsewhere spawn (the task function, its
  initializer and the items must then be picklable module-level objects).
* **Single-threaded workers**: ``num_workers`` processes use the cores; torch and BLAS inside
  each are limited to one thread.

:func:`parallel_map` yields ``(index, result)`` pairs in completion order (the index is the
item's position in the input); :func:`parallel_list` returns the results in input order. Both
drive a :class:`~segpipe.progress.Progress` with the stage's description.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, TypeVar

from .progress import Progress

T = TypeVar("T")
R = TypeVar("R")

__all__ = [
    "DEFAULT_HINT",
    "RemoteTraceback",
    "cap_num_workers",
    "default_num_workers",
    "signals_blocked",
    "parallel_list",
    "parallel_map",
    "resolve_num_workers",
    "worker_signals",
]

log = logging.getLogger("segpipe")

DEFAULT_HINT = "retry with fewer workers, e.g. num_workers=1"
JOIN_TIMEOUT = 5.0  # seconds to wait for a SIGKILLed worker to be reaped
_WATCHDOG_INTERVAL = 1.0
_PR_SET_PDEATHSIG = 1
_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
)


# ---------------------------------------------------------------------------- core count
def _cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> int | None:
    """CPUs allowed by a cgroup CPU quota (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), or None."""
    base = Path(root)
    try:
        quota, period = (base / "cpu.max").read_text(encoding="ascii").split()[:2]
        if quota != "max" and float(period) > 0:
            return max(1, math.ceil(float(quota) / float(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = float((base / "cpu" / "cpu.cfs_quota_us").read_text(encoding="ascii"))
        period_us = float((base / "cpu" / "cpu.cfs_period_us").read_text(encoding="ascii"))
        if quota_us > 0 and period_us > 0:
            return max(1, math.ceil(quota_us / period_us))
    except (OSError, ValueError):
        pass
    return None


def default_num_workers() -> int:
    """Usable CPU cores: the affinity mask where the OS has one, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_limit()
    return max(1, min(cores, quota) if quota else cores)


def resolve_num_workers(num_workers: int | None, n_tasks: int | None = None) -> int:
    """``num_workers`` (None or 0: :func:`default_num_workers`), at least 1, at most ``n_tasks``."""
    workers = default_num_workers() if not num_workers else max(1, int(num_workers))
    if n_tasks is not None:
        workers = min(workers, max(1, n_tasks))
    return workers


_capped: set[tuple[int, int]] = set()  # (asked, cores) already said in this process


def cap_num_workers(num_workers: int) -> int:
    """``num_workers`` processes, at most the usable cores (:func:`default_num_workers`).

    Each worker holds its own cases or batches in memory and the cores are all busy already, so
    more workers than cores only cost memory. A larger number is lowered with one warning line
    (said once per process for each number asked)."""
    cores = default_num_workers()
    asked = int(num_workers)
    if asked <= cores:
        return asked
    if (asked, cores) not in _capped:
        _capped.add((asked, cores))
        log.warning(f"num_workers={asked} is more than the {cores} usable CPU cores: using {cores} workers")
    return cores


# ---------------------------------------------------------------------------- worker side
class RemoteTraceback(Exception):
    """The formatted traceback of an exception raised in a worker (set as its ``__cause__``)."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # pragma: no cover - no prctl: the watchdog remains
            pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)

    def watchdog() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_WATCHDOG_INTERVAL)
        os._exit(1)

    threading.Thread(target=watchdog, name="segpipe-parent-watchdog", daemon=True).start()


def worker_signals(parent_pid: int) -> None:
    """Signals in a worker process of one of segpipe's pools (this module's, the training loader's),
    called first thing in the worker.

    The parent handles every signal and stops its pool itself: SIGINT (Ctrl-C reaches the whole
    process group) and SIGUSR1 (a scheduler's warning, sent to every process of a job) are ignored
    here. SIGTERM ends the worker at once when the parent sends it (a pool shutting down a worker);
    sent by anyone else (``kill -TERM -PGID``, a scheduler ending the job) it is left to the parent,
    which saves what it must and then stops its workers. Where the system cannot tell who sent a
    signal (no ``sigwaitinfo``), SIGTERM ends the worker. The worker dies with its parent
    (``PR_SET_PDEATHSIG``, and a watchdog thread).
    """
    for name in ("SIGINT", "SIGUSR1"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
        # blocked in this thread before any other starts, so that every thread of the worker has it
        # blocked and only sigwaitinfo below receives it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

        def sigterm() -> None:
            while True:
                info = signal.sigwaitinfo({signal.SIGTERM})
                if info.si_pid == parent_pid or os.getppid() != parent_pid:
                    os._exit(0)

        threading.Thread(target=sigterm, name="segpipe-worker-sigterm", daemon=True).start()
    else:  # pragma: no cover - not Linux
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent(parent_pid)


def _single_threaded() -> None:
    for name in _THREAD_ENV:  # libraries loaded from now on
        os.environ[name] = "1"
    torch = sys.modules.get("torch")  # imported by the parent before the fork
    if torch is not None:
        with contextlib.suppress(Exception):
            torch.set_num_threads(1)
    with contextlib.suppress(Exception):  # BLAS pools numpy already started
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)


def _error_message(index: int, exc: BaseException) -> tuple[int, bool, Any, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        pickle.loads(pickle.dumps(exc))  # an exception the parent can rebuild
        payload: BaseException = exc
    except Exception:
        payload = RuntimeError(f"{type(exc).__name__}: {exc}")
    return index, False, payload, tb


def _worker_main(
    conn: Connection,
    fn: Callable[[Any], Any],
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    parent_pid: int,
) -> None:
    worker_signals(parent_pid)  # the parent handles Ctrl-C and SIGTERM; the worker dies with it
    _single_threaded()
    try:
        if initializer is not None:
            initializer(*initargs)
    except BaseException as exc:  # reported with the first task this worker receives
        init_error: BaseException | None = exc
    else:
        init_error = None
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe or died
            break
        if message is None:
            break
        index, item = message
        try:
            if init_error is not None:
                raise init_error
            reply: tuple[int, bool, Any, str] = (index, True, fn(item), "")
        except BaseException as exc:
            reply = _error_message(index, exc)
        try:
            conn.send(reply)
        except (BrokenPipeError, EOFError, OSError):
            break
        except Exception as exc:  # the result does not pickle
            conn.send(_error_message(index, exc))
    conn.close()


# ---------------------------------------------------------------------------- parent side
def _context() -> Any:
    return mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Block SIGINT and SIGTERM in this thread meanwhile; one that arrives is delivered at the end.

    Used while forking one worker (a child must not get them before it has set its own handling, see
    :func:`worker_signals`), while killing the pool, and while OpenVINO starts its threads (they
    inherit the mask, so the signals reach Python's main thread, never one of them)."""
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class _Worker:
    def __init__(
        self, ctx: Any, fn: Callable[[Any], Any], initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]
    ):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_worker_main,
            args=(child, fn, initializer, initargs, os.getpid()),
            daemon=True,
            name="segpipe-worker",
        )
        self.process.start()
        child.close()
        self.task: int | None = None  # the input index it is working on

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            if self.process.is_alive():
                self.process.kill()

    def reap(self, timeout: float) -> None:
        with contextlib.suppress(Exception):
            self.process.join(timeout)
        with contextlib.suppress(Exception):
            self.conn.close()


def _death_reason(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if -exitcode == signal.SIGKILL:
            return f"killed by {name}, probably out of memory"
        return f"killed by {name}"
    return f"exit code {exitcode}"


def _dead_worker_error(worker: _Worker, names: Callable[[int], str], context: str, hint: str) -> Exception:
    from .errors import StateError

    with contextlib.suppress(Exception):
        worker.process.join(1.0)
    where = f" on {names(worker.task)}" if worker.task is not None else ""
    prefix = f"{context}: " if context else ""
    reason = _death_reason(worker.process.exitcode)
    return StateError(f"{prefix}a worker died ({reason}){where}", hint=hint)


def _run_pool(
    fn: Callable[[T], R],
    items: Sequence[T],
    indices: Sequence[int],
    workers: int,
    *,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    names: Callable[[int], str],
    context: str,
    hint: str,
) -> Generator[tuple[int, R], None, None]:
    ctx = _context()
    pool: list[_Worker] = []
    try:
        for _ in range(workers):  # a signal between two forks stops the spawning (the finally kills the rest)
            with signals_blocked():
                pool.append(_Worker(ctx, fn, initializer, initargs))
        queue = iter(zip(indices, items, strict=True))

        def feed(worker: _Worker) -> None:
            nxt = next(queue, None)
            if nxt is None:
                worker.task = None
                return
            worker.task = nxt[0]
            try:
                worker.conn.send(nxt)
            except (BrokenPipeError, EOFError, OSError):
                raise _dead_worker_error(worker, names, context, hint) from None

        for worker in pool:
            feed(worker)
        while any(w.task is not None for w in pool):
            busy = [w for w in pool if w.task is not None]
            by_conn: dict[Any, _Worker] = {w.conn: w for w in busy}
            by_sentinel: dict[Any, _Worker] = {w.process.sentinel: w for w in busy}
            ready = wait([*by_conn, *by_sentinel])
            for obj in ready:  # results first: a worker that answered and then exited is not lost
                answered = by_conn.get(obj)
                if answered is None:
                    continue
                try:
                    index, ok, payload, tb = answered.conn.recv()
                except (EOFError, OSError):
                    raise _dead_worker_error(answered, names, context, hint) from None
                if not ok:
                    if tb:
                        payload.__cause__ = RemoteTraceback(tb)
                    raise payload
                feed(answered)
                yield index, payload
            for obj in ready:
                exited = by_sentinel.get(obj)
                if exited is not None and exited.task is not None and not exited.conn.poll():
                    raise _dead_worker_error(exited, names, context, hint)
        for worker in pool:  # orderly end: idle workers read None and exit
            with contextlib.suppress(Exception):
                worker.conn.send(None)
        deadline = time.monotonic() + JOIN_TIMEOUT
        for worker in pool:
            worker.reap(max(0.0, deadline - time.monotonic()))
    finally:  # interrupt, error, dead worker or an abandoned generator: kill, never wait on a worker
        with signals_blocked():  # a second Ctrl-C or SIGTERM must not cut the cleanup short (delivered after)
            for worker in pool:
                worker.kill()
            for worker in pool:
                worker.reap(JOIN_TIMEOUT)


def parallel_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    *,
    num_workers: int | None = None,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    desc: str = "",
    unit: str = "case",
    names: Callable[[int], str] | None = None,
    context: str = "",
    hint: str = DEFAULT_HINT,
    first_in_parent: bool = False,
    preload: Sequence[str] = (),
    progress: bool = True,
) -> Generator[tuple[int, R], None, None]:
    """Run ``fn(item)`` for every item on ``num_workers`` processes; yield ``(index, result)`` as they finish.

    ``num_workers`` None or 0 means :func:`default_num_workers`; with one worker (or one item)
    everything runs in this process. Pass shared read-only data by binding it,
    ``functools.partial(task, dataset)``: forked workers inherit it without pickling.
    ``initializer(*initargs)`` runs once in each worker process only. ``first_in_parent`` runs
    the first item here before forking, so the workers inherit the modules it imported (a
    reader's, scipy's) instead of each importing them; ``preload`` names modules to import here
    before forking for the same reason (``("torch",)`` for a stage whose workers need it). ``names(index)`` names an item in messages (default ``"item <index>"``);
    ``context`` prefixes them (a dataset or cache folder). An exception raised by ``fn`` is
    re-raised here (its worker traceback as ``__cause__``) after the other workers are killed;
    a worker that dies raises :class:`~segpipe.errors.StateError` with ``hint``.

    Consume the iterator to the end or close it (``contextlib.closing``): closing kills the workers.
    """
    tasks = list(items)
    name_of = names or (lambda i: f"{unit} {i}")
    workers = cap_num_workers(resolve_num_workers(num_workers, len(tasks)))
    bar = Progress(desc, total=len(tasks), unit=unit, enabled=progress and bool(desc))
    try:
        start = 0
        if workers <= 1 or first_in_parent:
            stop = len(tasks) if workers <= 1 else min(1, len(tasks))
            for index in range(stop):
                result = fn(tasks[index])
                bar.update()
                yield index, result
            start = stop
        if start < len(tasks):
            rest = range(start, len(tasks))
            if _context().get_start_method() == "fork":
                for module in preload:
                    importlib.import_module(module)
            for index, result in _run_pool(
                fn,
                tasks[start:],
                rest,
                min(workers, len(rest)),
                initializer=initializer,
                initargs=initargs,
                names=name_of,
                context=context,
                hint=hint,
            ):
                bar.update()
                yield index, result
    finally:
        bar.close()


def parallel_list(fn: Callable[[T], R], items: Iterable[T], **kwargs: Any) -> list[R]:
    """:func:`parallel_map`'s results in input order (same keyword arguments)."""
    tasks = list(items)
    results: list[Any] = [None] * len(tasks)
    with contextlib.closing(parallel_map(fn, tasks, **kwargs)) as it:
        for index, result in it:
            results[index] = result
    return results
