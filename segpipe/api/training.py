"""The API's ``train``: one cross-validation fold of a planned dataset."""

from __future__ import annotations

import logging
from typing import Any

from ..config import to_container
from ..errors import UsageError
from ..splits import N_FOLDS
from .common import changed_since_planning, composed, configurations, paths_checked, planned_dataset
from .data import preprocess


@paths_checked
def train(*, log: Any = None, overwrite: bool = False, started: float | None = None, **settings: Any) -> dict[str, Any]:
    """Train one cross-validation fold of a planned dataset (``segpipe train fold=0``).

    Settings are those of ``segpipe train`` (``segpipe train --help``): ``work_dir``, ``dataset``
    (default: the workspace's only planned dataset), ``config`` (default ``3d_fullres``),
    ``num_workers``, the ``train`` group (``fold``, ``epochs``, ``iterations_per_epoch``,
    ``batch_size``, ``device``, ``precision``, ``max_time``, ``seed``, ``deterministic``, …),
    ``optim=`` / ``loss=`` with their options' keys (``lr``, ``alpha``, …). Preprocesses first
    when the configuration's cache lacks cases. Trains into ``runs/<config>/fold_<k>/`` of the
    dataset's workspace folder and resumes a run that was interrupted; a finished run returns at
    once (``overwrite=True`` trains it again). ``max_time`` counts from ``started`` (a
    ``time.perf_counter()`` value; default: this call; the CLI passes its own launch). Returns the
    run's summary (``run_dir``, ``epochs``, ``finished``, ``ema_fg_dice``, ``pseudo_dice``, …).
    """
    import time

    from ..config import given_settings
    from ..preprocessing import Cache
    from ..training.optim import budget_defaults
    from ..workspace import dataset_lock

    started = time.perf_counter() if started is None else float(started)
    from ..training.fit import fit

    dataset = settings.pop("dataset", None)
    config_value = settings.pop("config", settings.pop("configuration", None))
    cfg = composed("train", settings)
    ws, dws, the_plan, ds = planned_dataset("train", cfg.work_dir, dataset)
    if config_value is None:
        config_value = "3d_fullres" if "3d_fullres" in the_plan.configurations else next(iter(the_plan.configurations))
    names = configurations(config_value, the_plan)
    if len(names) != 1:
        raise UsageError(f"`segpipe train` trains one configuration, got {', '.join(names)}", hint="config=NAME")
    name = names[0]
    fold_text = str(cfg.train.fold)
    if fold_text != "all" and not (fold_text.isdigit() and 0 <= int(fold_text) < N_FOLDS):
        raise UsageError(
            f"fold={fold_text} is not a fold", hint=f"fold=0..{N_FOLDS - 1}, or fold=all to train on every case"
        )
    fold: int | str = int(fold_text) if fold_text.isdigit() else fold_text
    cache = Cache.for_configuration(ws.root, the_plan, name, dataset=dws.name)
    labelled = [c.id for c in ds.cases]
    if any(case_id not in cache for case_id in labelled):
        if log:
            log(f"the {name} cache of {dws.name} is incomplete: preprocessing first")
        prep = preprocess(dws.name, work_dir=str(ws.root), config=name, num_workers=cfg.num_workers, log=log)
        changed = prep.get("dataset_changed_since_plan")  # said by preprocess
    else:
        changed = changed_since_planning(dws, ds)
        if changed:  # the cache holds what was preprocessed; the warning says the sources moved on
            logging.getLogger("segpipe").warning(changed)
    train_group = {k: v for k, v in to_container(cfg.train).items() if k != "fold"}
    optim = to_container(cfg.optim)
    changes, line = budget_defaults(
        max_time=cfg.train.max_time,
        device=str(cfg.train.device),
        given=given_settings("train", settings),
        plan_batch=the_plan.config(name).batch_size,
    )
    if line:
        train_group["batch_size"] = changes.get("batch_size", train_group["batch_size"])
        optim["schedule_interval"] = changes.get("schedule_interval", optim["schedule_interval"])
        if log:
            log(line)
    fit_settings = {
        **train_group,
        "optim": optim,
        "loss": to_container(cfg.loss),
        "trainer": to_container(cfg.trainer),
        "num_workers": cfg.num_workers,
    }
    with dataset_lock(dws, "train", shared=True):
        result = fit(
            the_plan,
            name,
            fold,
            work_dir=ws.root,
            dataset=dws.name,
            settings=fit_settings,
            overwrite=overwrite,
            log=log,
            started=started,
        )
    out = {"dataset": dws.name, "configuration": name, "fold": str(fold), **result}
    return {**out, "dataset_changed_since_plan": changed} if changed else out
