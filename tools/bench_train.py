#!/usr/bin/env python
"""Benchmark training accuracy at equal wall time: nnU-Net v2's 1-epoch trainer, then segpipe.

Both tools train ``3d_fullres`` on fold 0 of the same split (segpipe's ``splits_final.json``,
nnU-Net's own fold definition, copied into nnU-Net's preprocessed folder so the 42 validation
cases of the hippocampus data are the same), on the CPU, in the same run on the same machine:

1. nnU-Net: ``nnUNetv2_plan_and_preprocess -c 3d_fullres`` (not timed), then
   ``nnUNetv2_train 999 3d_fullres 0 -tr nnUNetTrainer_1epoch -device cpu`` with
   ``nnUNet_compile=False nnUNet_n_proc_DA=2``, timed launch to exit (its final full-case
   validation included); its Dice from ``fold_0/validation/summary.json``.
2. segpipe: ``segpipe plan`` + ``segpipe preprocess`` (not timed), then
   ``segpipe train fold=0 config=3d_fullres max_time=<nnU-Net's wall seconds>`` with segpipe's
   defaults (``--segpipe-args`` adds settings),
   timed launch to exit (its final full-case validation included); its Dice from
   ``runs/3d_fullres/fold_0/validation/summary.json`` (the same summary format as nnU-Net's:
   per-class Dice averaged over the cases, then over the foreground classes).

    python tools/bench_train.py --nnunet-python ../nnunet-venv/bin/python --json out.json
    python tools/bench_train.py --max-time 20m          # segpipe only, with a given budget

Without ``--nnunet-python`` nnU-Net is skipped with a message; the budget is then ``--max-time``
(default: nnU-Net's 1411 s from REFERENCE.md, a figure from another run, printed as such).
Each step prints as it finishes; the whole run takes about twice nnU-Net's training time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import nnunet_raw, run_measured  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
#: REFERENCE.md, one machine of this kind: nnUNetTrainer_1epoch 1411 s, Dice 0.820 (0.818 / 0.822)
REFERENCE_NNUNET = {"wall_s": 1411.0, "foreground_dice": 0.820}
#: the Dice segpipe must exceed in any case (besides the same-run nnU-Net figure)
TARGET_DICE = 0.820
#: segpipe's training settings for this benchmark besides fold, config and max_time: none. segpipe's
#: defaults decide (on a CPU a budget trains with batch 2 and a per-iteration schedule: see
#: segpipe.training.optim.budget_defaults); --segpipe-args adds settings to compare against them
#: peak-RSS sampling period of the timed training runs: each sample walks the process tree, which at
#: bench_plan's 20 ms took about a tenth of a core away from the training being timed
RSS_INTERVAL = 0.5
DEFAULT_SEGPIPE_ARGS: list[str] = []


def _segpipe_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def _segpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "segpipe", *args]


def _say(text: str) -> None:
    print(text, flush=True)


def _check(step: str, result: dict[str, Any]) -> None:
    if result["returncode"] != 0:
        raise RuntimeError(f"{step} failed (exit {result['returncode']}):\n{result['output_tail']}")


def _dice(summary_path: Path) -> dict[str, Any]:
    summary = json.loads(summary_path.read_text())
    return {
        "foreground_dice": summary["foreground_mean"]["Dice"],
        "per_class": {k: v["Dice"] for k, v in summary["mean"].items()},
        "cases": len(summary.get("metric_per_case", [])),
    }


def prepare_segpipe(data: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    """Plan and preprocess (not timed); returns the dataset's workspace folder and the timings."""
    env = _segpipe_env()
    plan = run_measured(_segpipe("plan", str(data), f"work_dir={work}"), env=env, cwd=REPO)
    _check("segpipe plan", plan)
    pre = run_measured(_segpipe("preprocess", f"work_dir={work}", "config=3d_fullres"), env=env, cwd=REPO)
    _check("segpipe preprocess", pre)
    entries = [p.parent for p in work.glob("*/plans.json")]
    if len(entries) != 1:
        raise RuntimeError(f"expected one planned dataset in {work}, found {entries}")
    entry = entries[0]
    # the folds: segpipe's splits_final.json (nnU-Net's fold definition) over the cached cases
    snippet = (
        "import sys; from segpipe.preprocessing import Cache; from segpipe.planning import load_plan;"
        "from segpipe.data import load_or_create_splits;"
        "plan = load_plan(sys.argv[1] + '/plans.json');"
        "cache = Cache.for_configuration(sys.argv[2], plan, '3d_fullres', dataset=plan.dataset);"
        "load_or_create_splits(sys.argv[1] + '/splits_final.json', cache.cases())"
    )
    subprocess.run([sys.executable, "-c", snippet, str(entry), str(work)], env=env, cwd=REPO, check=True)
    return entry, {"plan_s": plan["wall_s"], "preprocess_s": pre["wall_s"]}


def bench_nnunet(python: Path, data: Path, tmp: Path, splits: Path) -> dict[str, Any]:
    bindir = python.parent
    prep, train = bindir / "nnUNetv2_plan_and_preprocess", bindir / "nnUNetv2_train"
    for exe in (prep, train):
        if not exe.exists():
            raise RuntimeError(f"{exe} not found (is nnunetv2 installed in {python}'s environment?)")
    raw, pre, res = tmp / "nnUNet_raw", tmp / "nnUNet_preprocessed", tmp / "nnUNet_results"
    for d in (raw, pre, res):
        d.mkdir(parents=True)
    name, _ = nnunet_raw(data, raw)
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(res),
        "nnUNet_compile": "False",
        "nnUNet_n_proc_DA": "2",
    }
    _say("nnU-Net: plan and preprocess (not timed) ...")
    pp = run_measured([str(prep), "-d", "999", "-c", "3d_fullres", "-np", "2"], env=env)
    _check("nnUNetv2_plan_and_preprocess", pp)
    shutil.copyfile(splits, pre / name / "splits_final.json")
    plans = json.loads((pre / name / "nnUNetPlans.json").read_text())["configurations"]["3d_fullres"]
    _say(
        f"nnU-Net: plan and preprocess {pp['wall_s']:.0f} s; 3d_fullres patch {plans['patch_size']} "
        f"batch {plans['batch_size']}; training nnUNetTrainer_1epoch on fold 0 (timed) ..."
    )
    tr = run_measured(
        [str(train), "999", "3d_fullres", "0", "-tr", "nnUNetTrainer_1epoch", "-device", "cpu"],
        env=env,
        interval=RSS_INTERVAL,
    )
    _check("nnUNetv2_train", tr)
    summary = next(res.glob(f"{name}/nnUNetTrainer_1epoch__nnUNetPlans__3d_fullres/fold_0/validation/summary.json"))
    out = {
        "train_wall_s": tr["wall_s"],
        "train_peak_rss_mb": tr["peak_rss_mb"],
        "plan_and_preprocess_s": pp["wall_s"],
        "patch_size": plans["patch_size"],
        "batch_size": plans["batch_size"],
        **_dice(summary),
        "command": "nnUNetv2_train 999 3d_fullres 0 -tr nnUNetTrainer_1epoch -device cpu",
    }
    _say(
        f"nnU-Net: {out['train_wall_s']:.0f} s launch to exit, fold-0 foreground Dice "
        f"{out['foreground_dice']:.4f} {out['per_class']}, peak RSS {out['train_peak_rss_mb']:.0f} MB"
    )
    return out


def bench_segpipe(work: Path, entry: Path, max_time_s: float, extra: list[str]) -> dict[str, Any]:
    args = ["train", "fold=0", "config=3d_fullres", f"work_dir={work}", f"max_time={max_time_s:.0f}s", *extra]
    _say(f"segpipe: {' '.join(['segpipe', *args])} (timed) ...")
    tr = run_measured(_segpipe(*args), env=_segpipe_env(), cwd=REPO, interval=RSS_INTERVAL)
    _check("segpipe train", tr)
    run = entry / "runs" / "3d_fullres" / "fold_0"
    metrics = (run / "metrics.csv").read_text().splitlines()
    out = {
        "train_wall_s": tr["wall_s"],
        "train_peak_rss_mb": tr["peak_rss_mb"],
        "max_time_s": round(max_time_s),
        "epochs": len(metrics) - 1,
        "settings": json.loads((run / "settings.json").read_text()).get("settings"),
        **_dice(run / "validation" / "summary.json"),
        "command": " ".join(["segpipe", *args]),
    }
    _say(
        f"segpipe: {out['train_wall_s']:.0f} s launch to exit ({out['epochs']} epochs), fold-0 foreground "
        f"Dice {out['foreground_dice']:.4f} {out['per_class']}, peak RSS {out['train_peak_rss_mb']:.0f} MB"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: shared hippocampus)")
    ap.add_argument("--nnunet-python", type=Path, default=None, help="a Python with nnunetv2 installed")
    ap.add_argument("--max-time", default=None, help="segpipe's budget when nnU-Net is not run (e.g. 20m)")
    ap.add_argument("--work", type=Path, default=None, help="keep the workspaces here (default: a temp folder)")
    ap.add_argument(
        "--segpipe-args",
        default=" ".join(DEFAULT_SEGPIPE_ARGS),
        help="further segpipe train settings (default: none, segpipe's defaults)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    from segpipe.training.optim import parse_duration

    tmp_ctx = tempfile.TemporaryDirectory(prefix="bench_train_") if a.work is None else None
    root = Path(tmp_ctx.name) if tmp_ctx is not None else a.work
    root.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"data": str(a.data), "cpu_count": os.cpu_count(), "started": time.ctime()}
    try:
        _say("segpipe: plan and preprocess (not timed) ...")
        entry, prep = prepare_segpipe(a.data, root / "segpipe")
        result["segpipe_prepare"] = prep
        if a.nnunet_python is not None:
            result["nnunet"] = bench_nnunet(a.nnunet_python, a.data, root / "nnunet", entry / "splits_final.json")
            budget, source = result["nnunet"]["train_wall_s"], "nnU-Net's wall time in this run"
        else:
            _say("nnU-Net: skipped (no --nnunet-python)")
            if a.max_time is not None:
                budget, source = parse_duration(a.max_time), "--max-time"
            else:
                budget = REFERENCE_NNUNET["wall_s"]
                source = "REFERENCE.md's nnU-Net time (another run, not this machine's)"
        _say(f"segpipe budget: {budget:.0f} s ({source})")
        result["budget_source"] = source
        result["segpipe"] = bench_segpipe(root / "segpipe", entry, budget, a.segpipe_args.split())
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()

    sp = result["segpipe"]
    nn = result.get("nnunet")
    _say("")
    _say("fold-0 full-case validation, mean foreground Dice (training time launch to exit):")
    if nn is not None:
        _say(f"  nnU-Net v2 nnUNetTrainer_1epoch  {nn['foreground_dice']:.4f}  {nn['train_wall_s']:7.0f} s")
    else:
        ref = REFERENCE_NNUNET
        _say(f"  nnU-Net v2 (REFERENCE.md, another run)  {ref['foreground_dice']:.4f}  {ref['wall_s']:7.0f} s")
    _say(f"  segpipe 3d_fullres (max_time)    {sp['foreground_dice']:.4f}  {sp['train_wall_s']:7.0f} s")
    bar = max(TARGET_DICE, nn["foreground_dice"] if nn is not None else 0.0)
    within = sp["train_wall_s"] <= budget
    result["target"] = {"dice_to_exceed": bar, "dice_exceeded": sp["foreground_dice"] > bar, "within_budget": within}
    _say(
        f"segpipe {'exceeds' if sp['foreground_dice'] > bar else 'does NOT exceed'} {bar:.4f} and "
        f"{'stayed within' if within else 'ran PAST'} its {budget:.0f} s budget"
    )
    if a.json is not None:
        a.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
