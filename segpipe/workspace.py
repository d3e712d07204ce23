"""The workspace: the one module that knows where every artefact lives.

One workspace folder (``work_dir=``, else ``$SEGPIPE_WORK``, else ``./segpipe_work``) holds one
subfolder per dataset::

    <work_dir>/
      <dataset>/
        source.json            where the dataset came from (refuses a different one under the same name)
        fingerprint.json       measured by `segpipe plan`
        plans.json             planned configurations
        plan_summary.md        the plan table, for people
        dataset_report.png     spacing, size, intensity and class-volume distributions
        splits_final.json      cross-validation folds
        cache/<data id>/<case>/   preprocessed cases (see segpipe.preprocessing.Cache)
        runs/<config>/fold_<k>/   training runs
        exports/                  exported model folders
      raw/                     datasets written by `segpipe demo`

No other module builds a workspace path: they ask a :class:`Workspace` or a
:class:`DatasetWorkspace` for it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StateError, UsageError

DEFAULT_WORK_DIR = "segpipe_work"
ENV_WORK_DIR = "SEGPIPE_WORK"
SOURCE_FILE = "source.json"
FINGERPRINT_FILE = "fingerprint.json"
PLANS_FILE = "plans.json"
MODEL_FILE = "model.json"  # a model folder (segpipe export) holds a plans.json too
PLAN_SUMMARY_FILE = "plan_summary.md"
DATASET_REPORT_FILE = "dataset_report.png"
SPLITS_FILE = "splits_final.json"
RESERVED_NAMES = ("raw",)

# A training run's folder, runs/<configuration>/fold_<k>/ (see RunFolder)
LAST, BEST, FINAL = "last.pt", "best.pt", "final.pt"
SETTINGS_FILE, METRICS_FILE, PROGRESS_FILE = "settings.json", "metrics.csv", "progress.png"
VALIDATION_DIR, TENSORBOARD_DIR = "validation", "tensorboard"
VALIDATION_SUMMARY_FILE = "summary.json"
REPORT_FILE, REPORT_FILES_DIR = "report.html", "report_files"  # a run's page for people and its images
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_work_dir(work_dir: str | os.PathLike[str] | None) -> Path:
    """The workspace folder: ``work_dir`` if given, else ``$SEGPIPE_WORK``, else ``./segpipe_work``."""
    if work_dir is None or str(work_dir) == "":
        work_dir = os.environ.get(ENV_WORK_DIR) or DEFAULT_WORK_DIR
    return Path(work_dir).expanduser().resolve()


def default_dataset_name(name: str) -> str:
    """The workspace folder of a dataset known by its folder's ``name``: the name itself when it
    can name a folder, else spelled in ASCII letters, digits, '.', '_' and '-' (accents dropped,
    anything else a '_': ``Dätensatz mit Leerzeichen`` → ``Datensatz_mit_Leerzeichen``)."""
    if _NAME_RE.match(name) and name not in RESERVED_NAMES:
        return name
    plain = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", plain).strip("._-")
    if not safe:
        return "dataset"
    return safe if safe not in RESERVED_NAMES else f"{safe}_dataset"


def check_dataset_name(name: str) -> str:
    """A dataset name usable as one folder of the workspace (no separators, not reserved)."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in RESERVED_NAMES or name in (".", ".."):
        raise UsageError(
            f"dataset name {name!r} cannot name a workspace folder",
            hint="use letters, digits, '.', '_' or '-' (e.g. dataset_name=Hippocampus_v2), not 'raw'",
        )
    return name


@dataclass(frozen=True)
class Workspace:
    """A workspace folder. Creating the object touches nothing; :meth:`ensure_writable` checks it."""

    root: Path

    @classmethod
    def at(cls, work_dir: str | os.PathLike[str] | None = None) -> Workspace:
        return cls(resolve_work_dir(work_dir))

    def ensure_writable(self) -> Workspace:
        """Create the folder if needed and prove it is writable, before any long computation."""
        root = self.root
        if root.exists() and not root.is_dir():
            raise StateError(
                f"work_dir {root} is a file, not a folder", hint="pass another work_dir=PATH (or remove that file)"
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
            probe = root / f".segpipe-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            if root.is_dir() and exc.errno == errno.ENOENT:  # /proc and the like: a folder that takes no files
                reason = "the file system there takes no new files"
            raise StateError(
                f"work_dir {root} is not writable ({reason})", hint="pass a writable work_dir=PATH or set $SEGPIPE_WORK"
            ) from None
        return self

    @property
    def raw_dir(self) -> Path:
        """Where ``segpipe demo`` writes its generated datasets."""
        return self.root / "raw"

    def dataset(self, name: str) -> DatasetWorkspace:
        return DatasetWorkspace(self, check_dataset_name(name))

    def datasets(self) -> list[str]:
        """Names of the datasets this workspace holds (those with a source record or a plan; a model
        folder exported into the workspace also holds a plan, beside its ``model.json``, and is none)."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if (
                p.is_dir()
                and p.name not in RESERVED_NAMES
                and ((p / SOURCE_FILE).is_file() or (p / PLANS_FILE).is_file())
                and not ((p / MODEL_FILE).is_file() and not (p / SOURCE_FILE).is_file())
            ):
                out.append(p.name)
        return out

    def planned_datasets(self) -> list[str]:
        return [n for n in self.datasets() if (self.root / n / PLANS_FILE).is_file()]

    def only_dataset(self, command: str) -> DatasetWorkspace:
        """The one planned dataset, for commands after ``plan`` given no dataset; else a clear error."""
        names = self.planned_datasets()
        if len(names) == 1:
            return self.dataset(names[0])
        if not names:
            raise StateError(
                f"workspace {self.root} holds no planned dataset",
                hint=f"run `segpipe plan DATASET work_dir={self.root}` first, or pass the workspace as work_dir=PATH",
            )
        raise UsageError(
            f"workspace {self.root} holds {len(names)} planned datasets: {', '.join(names)}",
            hint=f"say which one: segpipe {command} dataset=NAME",
        )


@dataclass(frozen=True)
class DatasetWorkspace:
    """The folder of one dataset inside a workspace, and every artefact path in it."""

    workspace: Workspace
    name: str

    @property
    def root(self) -> Path:
        return self.workspace.root / self.name

    @property
    def source_path(self) -> Path:
        return self.root / SOURCE_FILE

    @property
    def fingerprint_path(self) -> Path:
        return self.root / FINGERPRINT_FILE

    @property
    def plans_path(self) -> Path:
        return self.root / PLANS_FILE

    @property
    def plan_summary_path(self) -> Path:
        return self.root / PLAN_SUMMARY_FILE

    @property
    def dataset_report_path(self) -> Path:
        return self.root / DATASET_REPORT_FILE

    @property
    def splits_path(self) -> Path:
        return self.root / SPLITS_FILE

    @property
    def cache_root(self) -> Path:
        return self.root / "cache"

    def cache_dir(self, data_identifier: str) -> Path:
        """One cache folder per data identifier: configurations on the same grid share it."""
        return self.cache_root / data_identifier

    def run_dir(self, configuration: str, fold: int | str) -> Path:
        return self.root / "runs" / configuration / f"fold_{fold}"

    def run_folder(self, configuration: str, fold: int | str) -> RunFolder:
        """The run of ``configuration`` on ``fold`` (:class:`RunFolder`)."""
        return RunFolder(self.run_dir(configuration, fold))

    @property
    def best_configuration_path(self) -> Path:
        """``segpipe find-best``'s decision: the configuration(s) and post-processing ``infer`` uses."""
        return self.root / "best_configuration.json"

    @property
    def best_configuration_report_path(self) -> Path:
        """The page for people of ``segpipe find-best``'s decision, beside it."""
        return self.root / "best_configuration.html"

    @property
    def openvino_dir(self) -> Path:
        """The networks ``infer`` converted for OpenVINO, one folder per weights, shape and version."""
        return self.root / "openvino"

    @property
    def exports_dir(self) -> Path:
        return self.root / "exports"

    # ------------------------------------------------------------------ source record
    def source(self) -> dict[str, Any] | None:
        """The recorded source of this dataset (``{"path", "layout", ...}``), or None."""
        try:
            data = json.loads(self.source_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def source_dataset_path(self) -> Path:
        """The dataset folder this workspace entry was planned from."""
        src = self.source()
        if not src or not src.get("path"):
            raise StateError(
                f"{self.root}: no record of the dataset it was planned from",
                hint=f"run `segpipe plan DATASET work_dir={self.workspace.root}` again",
            )
        return Path(src["path"])

    def claim(self, dataset_root: str | os.PathLike[str], *, layout: str | None = None) -> None:
        """Record that this entry holds the dataset at ``dataset_root``; refuse a different one.

        Two datasets whose folders share a name would otherwise mix their fingerprints, plans and
        caches. The record is written once; the same source again is fine.
        """
        from .io.jsonio import write_json

        src = str(Path(dataset_root).expanduser().resolve())
        known = self.source()
        if known is not None and known.get("path") and known["path"] != src:
            raise StateError(
                f"workspace {self.workspace.root} already holds a dataset named {self.name!r} from {known['path']}; "
                f"{src} is a different folder",
                hint="give this one another name (dataset_name=NAME) or use another work_dir=PATH",
            )
        if known is None or known.get("layout") != layout:
            self.root.mkdir(parents=True, exist_ok=True)
            write_json(self.source_path, {"path": src, "layout": layout, "name": self.name})


def find_dataset(
    work_dir: str | os.PathLike[str] | None, dataset: str | os.PathLike[str] | None, command: str
) -> tuple[Workspace, DatasetWorkspace]:
    """The workspace entry a command after ``plan`` works on.

    ``dataset`` may be a workspace dataset name, a dataset folder that was planned (its recorded
    source), or None when the workspace holds exactly one planned dataset.
    """
    ws = Workspace.at(work_dir)
    if dataset is None or str(dataset) == "":
        return ws, ws.only_dataset(command)
    text = str(dataset)
    if _NAME_RE.match(text) and (ws.root / text / PLANS_FILE).is_file():
        return ws, ws.dataset(text)
    folder = Path(text).expanduser().resolve()
    for name in ws.planned_datasets():
        src = ws.dataset(name).source()
        if src and src.get("path") == str(folder):
            return ws, ws.dataset(name)
    planned = ws.planned_datasets()
    raise StateError(
        f"dataset {text} is not planned in workspace {ws.root}"
        + (f" (planned: {', '.join(planned)})" if planned else ""),
        hint=f"run `segpipe plan {text} work_dir={ws.root}` first",
    )


LOCK_FILE = ".segpipe.lock"


@contextmanager
def dataset_lock(entry: DatasetWorkspace, command: str, *, shared: bool = False) -> Iterator[None]:
    """Hold the dataset's workspace folder for ``command`` while the block runs.

    ``plan`` and ``preprocess`` hold it alone (they rewrite the fingerprint, plan and caches);
    ``train`` shares it with other trainings (folds train side by side) but not with those. A
    second command that cannot have it fails at once with a :class:`StateError` saying which
    command holds it; the lock dies with its process, so a killed command never leaves it held.
    Where the platform has no ``fcntl`` (Windows) nothing is locked.
    """
    entry.root.mkdir(parents=True, exist_ok=True)
    with _flock(
        entry.root / LOCK_FILE,
        command,
        shared=shared,
        busy=lambda holder: StateError(
            f"{entry.root}: {holder} is using this dataset; `segpipe {command}` cannot run beside it",
            hint="wait for that command to finish (or stop it), then run this one again",
        ),
    ):
        yield


@contextmanager
def run_lock(run_dir: str | os.PathLike[str], command: str = "train") -> Iterator[None]:
    """Hold one training run (``runs/<config>/fold_<k>/``) for ``command`` while the block runs.

    One process trains a run at a time: a second one fails at once with a :class:`StateError`
    naming the command and process that holds it, before it reads or writes anything of the run.
    The lock file sits beside the run folder (``runs/<config>/.fold_<k>.lock``) and, like the
    dataset's, dies with its process however it ends.
    """
    folder = Path(run_dir)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _flock(
        folder.parent / f".{folder.name}.lock",
        command,
        shared=False,
        busy=lambda holder: StateError(
            f"{folder}: {holder} is training this run; a second `segpipe {command}` of it cannot run beside it",
            hint="wait for that training to finish (or stop it), then run this one again; another fold or "
            "config= can train meanwhile",
        ),
    ):
        yield


@contextmanager
def _flock(path: Path, command: str, *, shared: bool, busy: Callable[[str], Exception]) -> Iterator[None]:
    """``flock`` ``path`` (shared or exclusive, never waiting) and record ``command`` and this process
    in it; ``busy(holder)`` is raised when another process holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS
        yield
        return
    import time

    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another segpipe command"
            raise busy(holder) from None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        f.seek(0)
        f.truncate()
        f.write(f"`segpipe {command}` (process {os.getpid()}, since {stamp})")
        f.flush()
        yield


@dataclass(frozen=True)
class RunFolder:
    """One training run, ``runs/<configuration>/fold_<k>/``, and the files it holds::

    settings.json   the resolved training settings and the library versions
    last.pt         the full training state after the last save (last.prev.pt: the one before)
    best.pt         the network weights at the best EMA pseudo-Dice so far
    final.pt        the network weights once the run has finished
    metrics.csv     one row per epoch; progress.png: the same history drawn
    tensorboard/    TensorBoard event files, when asked for
    validation/     the full-case validation: summary.json, dice_per_case.csv, <case>.npy
    report.html     the run for people (curves, validation, worst cases, settings); its images in report_files/
    """

    root: Path

    @property
    def last(self) -> Path:
        return self.root / LAST

    @property
    def best(self) -> Path:
        return self.root / BEST

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def settings(self) -> Path:
        return self.root / SETTINGS_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def progress(self) -> Path:
        return self.root / PROGRESS_FILE

    @property
    def validation_dir(self) -> Path:
        return self.root / VALIDATION_DIR

    @property
    def validation_summary(self) -> Path:
        return self.root / VALIDATION_DIR / VALIDATION_SUMMARY_FILE

    @property
    def report(self) -> Path:
        return self.root / REPORT_FILE

    @property
    def report_files(self) -> Path:
        return self.root / REPORT_FILES_DIR
