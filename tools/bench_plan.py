#!/usr/bin/env python
"""Benchmark ``segpipe plan`` (fingerprint + plan) against nnU-Net v2 on the same data.

Each step runs in a fresh subprocess; a sampler thread polls the total RSS of that process and
all its children every ``--interval`` seconds (default 20 ms) with psutil and keeps the highest.
Wall time is launch to exit (interpreter start and imports included, for both tools).

    python tools/bench_plan.py                                   # segpipe on ../shared/data/hippocampus
    python tools/bench_plan.py --nnunet-python /path/to/venv/bin/python --json

With ``--nnunet-python`` (a Python with nnunetv2; its ``nnUNetv2_*`` scripts sit beside it) the
dataset is linked into a temporary nnU-Net raw dataset (``Dataset999_<name>``, ``nnUNet_raw`` /
``nnUNet_preprocessed`` / ``nnUNet_results`` set to temp folders) and
``nnUNetv2_extract_fingerprint -np 2`` + ``nnUNetv2_plan_experiment`` are measured in the same run.
Without it, nnU-Net is skipped with a message and the figures from ``REFERENCE.md`` (same machine
kind, not this run) are printed for orientation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakRSS  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
# REFERENCE.md, 2 cores / CPU: extract_fingerprint -np 2 15.0 s 1.9 GB; plan_experiment 3.3 s 0.85 GB
REFERENCE_NNUNET = {"wall_s": 18.3, "peak_rss_mb": 1900.0}

SEGPIPE_SNIPPET = """
import sys
from segpipe.io.datasets import load_dataset
from segpipe.planning import PlanSettings, run_planning
ds = load_dataset(sys.argv[1])
workers = None if sys.argv[3] == "auto" else int(sys.argv[3])
plan, path = run_planning(ds, sys.argv[2], PlanSettings(), force=sys.argv[4] == "force", num_workers=workers)
print(path)
"""


def run_measured(
    cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, interval: float = 0.02
) -> dict[str, Any]:
    """Run ``cmd``; return wall seconds, peak total RSS (process + children, MB), exit code, output tail."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = PeakRSS(proc.pid, interval)
    sampler.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - start
    peak = sampler.stop()
    return {
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(peak / 2**20, 1),
        "returncode": proc.returncode,
        "output_tail": out[-2000:],
    }


def bench_segpipe(data: Path, work: Path, num_workers: str, interval: float) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    cmd = [sys.executable, "-c", SEGPIPE_SNIPPET, str(data), str(work), num_workers]
    fresh = run_measured([*cmd, "force"], env=env, cwd=REPO, interval=interval)
    cached = run_measured([*cmd, "cache"], env=env, cwd=REPO, interval=interval)
    return {"fresh": fresh, "cached": cached}


def nnunet_raw(data: Path, raw: Path) -> tuple[str, int]:
    """Link an MSD/nnU-Net/case-folder dataset into ``raw/Dataset999_<name>``; returns (name, n_cases)."""
    sys.path.insert(0, str(REPO))
    from segpipe.io.datasets import load_dataset

    ds = load_dataset(data)
    if ds.channels_in_one_file and len(ds.channel_names) > 1:
        raise RuntimeError("multi-channel 4-D MSD images would need splitting; link single-channel data only")
    name = f"Dataset999_{ds.name.replace('_', '')}"
    root = raw / name
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    endings = set()
    for case in ds.cases:
        for c, img in enumerate(case.images):
            ending = "".join(Path(img).suffixes[-2:]) if str(img).endswith(".nii.gz") else Path(img).suffix
            endings.add(ending)
            os.symlink(Path(img).resolve(), root / "imagesTr" / f"{case.id}_{c:04d}{ending}")
        assert case.label is not None
        os.symlink(Path(case.label).resolve(), root / "labelsTr" / f"{case.id}{ending}")
    if len(endings) != 1:
        raise RuntimeError(f"mixed file types {sorted(endings)}; nnU-Net needs one file_ending")
    desc = {
        "channel_names": {str(k): v for k, v in ds.channel_names.items()},
        "labels": {v: k for k, v in sorted(ds.labels.items())},
        "numTraining": len(ds.cases),
        "file_ending": endings.pop(),
    }
    (root / "dataset.json").write_text(json.dumps(desc, indent=1))
    return name, len(ds.cases)


def bench_nnunet(python: Path, data: Path, tmp: Path, interval: float) -> dict[str, Any]:
    bindir = python.parent
    extract, plan = bindir / "nnUNetv2_extract_fingerprint", bindir / "nnUNetv2_plan_experiment"
    for exe in (extract, plan):
        if not exe.exists():
            raise RuntimeError(f"{exe} not found (is nnunetv2 installed in {python}'s environment?)")
    raw, pre, res = tmp / "nnUNet_raw", tmp / "nnUNet_preprocessed", tmp / "nnUNet_results"
    for d in (raw, pre, res):
        d.mkdir(parents=True)
    nnunet_raw(data, raw)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre), "nnUNet_results": str(res)}
    fp = run_measured([str(extract), "-d", "999", "-np", "2"], env=env, interval=interval)
    pl = run_measured([str(plan), "-d", "999"], env=env, interval=interval)
    for step, r in (("nnUNetv2_extract_fingerprint", fp), ("nnUNetv2_plan_experiment", pl)):
        if r["returncode"] != 0:
            raise RuntimeError(f"{step} failed (exit {r['returncode']}):\n{r['output_tail']}")
    plans = next(pre.glob("Dataset999_*/nnUNetPlans.json"), None)
    summary = None
    if plans is not None:
        conf = json.loads(plans.read_text()).get("configurations", {}).get("3d_fullres", {})
        summary = {k: conf.get(k) for k in ("spacing", "patch_size", "batch_size")}
    return {
        "extract_fingerprint": fp,
        "plan_experiment": pl,
        "total": {
            "wall_s": round(fp["wall_s"] + pl["wall_s"], 3),
            "peak_rss_mb": max(fp["peak_rss_mb"], pl["peak_rss_mb"]),
        },
        "3d_fullres": summary,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="dataset folder (default: shared hippocampus)")
    ap.add_argument("--nnunet-python", type=Path, default=None, help="a Python with nnunetv2 installed")
    ap.add_argument("--num-workers", default="auto", help="segpipe fingerprint workers (default: core count)")
    ap.add_argument("--interval", type=float, default=0.02, help="RSS sampling interval in seconds (≤ 0.05)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON only")
    args = ap.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        print(f"no dataset at {args.data} (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    interval = min(args.interval, 0.05)
    result: dict[str, Any] = {"data": str(args.data), "cpu_count": psutil.cpu_count(), "interval_s": interval}
    with tempfile.TemporaryDirectory(prefix="bench_plan_") as tmp:
        seg = bench_segpipe(args.data, Path(tmp) / "work", str(args.num_workers), interval)
        if seg["fresh"]["returncode"] != 0:
            print(seg["fresh"]["output_tail"], file=sys.stderr)
            return 1
        plan = json.loads(Path(seg["fresh"]["output_tail"].strip().splitlines()[-1]).read_text())
        conf = plan["configurations"].get("3d_fullres", {})
        seg["3d_fullres"] = {
            "spacing": conf.get("spacing"),
            "patch_size": conf.get("patch_size"),
            "batch_size": conf.get("batch_size"),
        }
        result["segpipe"] = seg
        nn = None
        if args.nnunet_python is None:
            result["nnunet_skipped"] = "no --nnunet-python given"
        elif not args.nnunet_python.exists():
            result["nnunet_skipped"] = f"{args.nnunet_python} does not exist"
        else:
            try:
                nn = bench_nnunet(args.nnunet_python, args.data, Path(tmp) / "nnunet", interval)
                result["nnunet"] = nn
            except (RuntimeError, OSError) as exc:
                result["nnunet_skipped"] = f"nnU-Net run failed: {exc}"
    ref = nn["total"] if nn else REFERENCE_NNUNET
    result["ratios"] = {
        "against": "nnunet (this run)" if nn else "REFERENCE.md figures (not measured in this run)",
        "speedup": round(ref["wall_s"] / seg["fresh"]["wall_s"], 2),
        "rss_fraction": round(seg["fresh"]["peak_rss_mb"] / ref["peak_rss_mb"], 3),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    rows = [("segpipe plan (fresh fingerprint)", seg["fresh"]), ("segpipe plan (cached fingerprint)", seg["cached"])]
    if nn:
        rows += [
            ("nnUNetv2_extract_fingerprint -np 2", nn["extract_fingerprint"]),
            ("nnUNetv2_plan_experiment", nn["plan_experiment"]),
            ("nnU-Net total", nn["total"]),
        ]
    width = max(len(r[0]) for r in rows)
    print(f"{'step':<{width}}  {'wall s':>8}  {'peak RSS MB':>12}")
    for name, r in rows:
        print(f"{name:<{width}}  {r['wall_s']:>8.2f}  {r['peak_rss_mb']:>12.1f}")
    if "nnunet_skipped" in result:
        print(
            f"nnU-Net skipped: {result['nnunet_skipped']}; REFERENCE.md (same machine kind): "
            f"{REFERENCE_NNUNET['wall_s']} s, {REFERENCE_NNUNET['peak_rss_mb']:.0f} MB"
        )
    r = result["ratios"]
    print(
        f"vs {r['against']}: {r['speedup']}x faster, {r['rss_fraction']:.2f}x the peak RSS "
        f"(targets: ≥ 3x faster, ≤ 0.5x RSS)"
    )
    print(f"segpipe 3d_fullres: {seg['3d_fullres']}" + (f"; nnU-Net: {nn['3d_fullres']}" if nn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
