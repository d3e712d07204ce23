"""Batch prediction on several processes: ``segpipe infer INPUT trainer=ddp devices=N num_nodes=M``.

The cases of a batch are shared out through Lightning's predict loop with the ``ddp`` strategy:
one process per device (a GPU, or a share of the CPU cores with the gloo backend) on each of
``num_nodes`` machines. Process ``r`` of ``W`` segments cases ``r, r + W, r + 2W, …`` of the
batch (in name order), so every case is segmented and written by exactly one process, with no
case repeated to even out the shares. Each process loads the model once, onto its own device,
and writes each of its cases exactly as a single-process run does (:func:`~.batch.segment_case`:
atomic files, the report last and naming the process's ``rank``), so a re-run, with any number of
processes, skips the finished cases. At the end every process holds the same summary of the whole
batch (what was written, skipped and what failed); the first process reports progress.

``segpipe infer`` starts the other processes of a machine itself (it runs the same command again
in each). A Python script calling :func:`segpipe.infer` with ``trainer="ddp"`` is run again the
same way, so its top level belongs under ``if __name__ == "__main__":``. Under SLURM, launch one
task per device with ``srun`` and give ``devices=`` and ``num_nodes=`` that match the job; the
output folder must be one that every machine sees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Sampler

from .. import runtime
from ..errors import ConfigError
from ..settings import configured
from .batch import CaseOutcome, InputCase, prediction_identity, prepare_output, segment_case
from .batch_report import REPORT_FILE, BatchReport, load_case_report
from .predictor import Predictor

__all__ = ["RankSampler", "infer_cases_ddp", "predict_trainer", "process_settings", "rank_device"]

#: devices a distributed batch can run on (``cuda:N`` picks one GPU: each process gets its own)


def process_settings(value: Any) -> dict[str, Any]:
    """``{"name": "single"|"ddp", "devices": N, "num_nodes": M}`` from the composed ``trainer`` option."""
    from ..settings import process_settings as checked

    return checked(value, single="segments in one process", several="shares the cases out among N × M processes")


def _accelerator(device: str) -> str:
    """Each process of a distributed batch takes its own device (process r of a machine its GPU r):
    a device index is refused, the rest is :func:`segpipe.runtime.accelerator`."""
    if str(device).strip().lower() not in runtime.DEVICES:
        raise ConfigError(
            f"device={device} with trainer=ddp: each process takes its own device",
            hint="device=auto, cpu or cuda (process r of a machine uses its GPU r)",
        )
    return runtime.accelerator(device)


def predict_trainer(*, device: str, devices: int, num_nodes: int, root: str | os.PathLike[str]) -> Any:
    """The Lightning trainer of a distributed batch (``ddp``: one process per device on each of
    ``num_nodes`` machines). Made before the model is loaded, it knows this process's rank."""
    accelerator = _accelerator(device)  # checked before Lightning is loaded
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        with runtime.quiet_lightning():
            return L.Trainer(
                accelerator=accelerator,
                strategy="ddp",
                devices=int(devices),
                num_nodes=int(num_nodes),
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                use_distributed_sampler=False,  # RankSampler shares the cases out, none twice
                default_root_dir=str(root),
                plugins=runtime.slurm_plugins(),
            )
    except MisconfigurationException as exc:
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"trainer=ddp devices={devices} num_nodes={num_nodes} on {accelerator}: {text}",
            hint="give devices= no more than the GPUs of one machine, and run trainer=ddp from a script or the CLI",
        ) from None


def rank_device(trainer: Any) -> str:
    """The device this process of ``trainer`` segments on: ``cpu``, or its own GPU ``cuda:<local rank>``."""
    from lightning.pytorch.accelerators import CPUAccelerator

    return "cpu" if isinstance(trainer.accelerator, CPUAccelerator) else f"cuda:{int(trainer.local_rank)}"


class RankSampler(Sampler[int]):
    """Case indices ``rank, rank + world, …`` of ``n``: every index on exactly one process, none
    repeated (unlike Lightning's distributed sampler, which pads the shares to equal length)."""

    def __init__(self, n: int, *, rank: int, world: int):
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not a process of {world}")
        self.n, self.rank, self.world = int(n), int(rank), int(world)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def _module(segment: Callable[[int], None]) -> Any:
    import lightning as L

    class CaseWriter(L.LightningModule):
        """Lightning's view of a batch: each predict step segments and writes one case."""

        def predict_step(self, batch: Any, batch_idx: int = 0) -> None:
            segment(int(batch))

    return CaseWriter()


def _gather(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's ``payload``, in rank order (this one's alone outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [payload]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, payload)
    return parts


def infer_cases_ddp(
    trainer: Any,
    predictor: Predictor,
    cases: list[InputCase],
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "nii.gz",
    probabilities: bool | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
    report: bool | None = None,
) -> dict[str, Any]:
    """:func:`~.batch.infer_cases` with the cases shared out among the processes of ``trainer``
    (:func:`predict_trainer`; see the module docstring). ``progress`` is called by the first process
    for its own cases (``done`` and ``total`` count its share). Returns the same summary on every
    process, with ``rank`` (this process) and ``processes`` (how many shared the batch) added."""
    probabilities = configured(probabilities, "infer.probabilities")
    report = bool(configured(report, "infer.report"))
    out = prepare_output(out_dir, fmt)
    identity = prediction_identity(predictor, fmt, probabilities)
    rank, world = int(trainer.global_rank), int(trainer.world_size)
    sampler = RankSampler(len(cases), rank=rank, world=world)
    share = len(sampler)
    outcomes: list[tuple[int, CaseOutcome]] = []
    t0 = time.perf_counter()

    def segment(index: int) -> None:
        case = cases[index]
        outcome = segment_case(
            predictor,
            case,
            out,
            fmt=fmt,
            identity=identity,
            probabilities=probabilities,
            overwrite=overwrite,
            report_extra={"rank": rank},
            stop_on=frozenset(),  # one process stopping alone would leave the others waiting: report the case
            figures=report,
        )
        outcomes.append((index, outcome))
        if progress and rank == 0:
            progress(len(outcomes), share, f"{case.id}: {outcome.note}")

    indices: Any = list(range(len(cases)))  # a map-style dataset: item i is case index i
    loader: DataLoader[int] = DataLoader(indices, batch_size=None, sampler=sampler, num_workers=0)
    with runtime.quiet_lightning():
        trainer.predict(_module(segment), dataloaders=loader, return_predictions=False)
    mine = {
        "outcomes": [(i, o.status, o.failure) for i, o in outcomes],
        "seconds": time.perf_counter() - t0,
        "model": predictor.describe(),
    }
    parts = _gather(mine)
    merged = sorted((item for part in parts for item in part["outcomes"]), key=lambda item: item[0])
    if [i for i, _, _ in merged] != list(range(len(cases))):  # the sampler's promise, checked
        raise RuntimeError(f"the processes reported {len(merged)} outcomes for {len(cases)} cases")
    page = BatchReport(out, [c.id for c in cases], identity, predictor.plan)
    page.include_folder()
    for i, status, failure in merged:
        page.add(cases[i].id, status, load_case_report(out, cases[i].id) if status != "failed" else None, failure)
    if report and rank == 0:  # every case is written by now: the first process writes the batch's report
        page.write()
    return {
        "output": str(out),
        "written": [cases[i].id for i, status, _ in merged if status == "written"],
        "skipped": [cases[i].id for i, status, _ in merged if status == "skipped"],
        "failed": [failure for _, status, failure in merged if status == "failed"],
        "flagged": page.flagged(),
        "report": str(out / REPORT_FILE) if report else None,
        "format": fmt,
        "seconds": round(max(part["seconds"] for part in parts), 3),
        "model": parts[0]["model"],
        "rank": rank,
        "processes": world,
    }
