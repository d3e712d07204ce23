#!/usr/bin/env python
"""Benchmark preprocessing and the augmented training loader, beside nnU-Net v2 when available.

Datasets: the shared hippocampus data (208 cases, MSD layout) and a generated anisotropic CT-like
set (``--ct-cases`` cases of about 512×512×120 voxels at 0.7–0.9 × 0.7–0.9 × 2.5–5 mm; ``--ct-small``
for 192×192×48 quick runs). For each:

* **preprocessing** (3d_fullres): wall time of the whole command, launch to exit, and peak RSS
  summed over its process tree (psutil, sampled every 20 ms in a background thread). nnU-Net:
  ``nnUNetv2_preprocess -d ID -c 3d_fullres -np W`` (after its fingerprint and planning, which are
  not timed); segpipe: ``preprocess_dataset(..., num_workers=W)`` in a child process, with the spec
  built from nnU-Net's plan when it ran (identical spacing, transpose and normalisation, so both
  write the same shapes), else from ``segpipe.planning``.
* **augmented batches/s** (3d_fullres patch and batch, nnU-Net's transform list and
  probabilities): ``--warmup`` batches, then ``--batches`` timed ``next()`` calls. nnU-Net:
  ``nnUNetTrainer.get_dataloaders()`` on CPU with ``nnUNet_n_proc_DA=W``; segpipe:
  ``SegDataModule.train_dataloader()`` with ``num_workers=W``.

    python tools/bench_data.py --nnunet-python /work/nnunet-venv/bin/python --json bench.json

Everything is written under ``--work-dir`` (default: a temp dir, removed at the end unless
``--keep``); a kept work dir reuses the generated CT-like set.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "data" / "hippocampus"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import PeakRSS  # noqa: E402


# ---------------------------------------------------------------------------- measuring
def run_measured(cmd: list[str], env: dict[str, str] | None = None, *, label: str) -> dict[str, Any]:
    """Run ``cmd``; wall time, peak tree RSS, and the last stdout line parsed as JSON when it is."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})}
    )
    mon = PeakRSS(proc.pid)
    mon.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    peak = mon.stop()
    if proc.returncode != 0:
        tail = "\n".join((err or out).strip().splitlines()[-25:])
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{tail}")
    result: dict[str, Any] = {"wall_s": round(wall, 2), "peak_rss_mb": round(peak / 2**20)}
    for line in reversed(out.strip().splitlines()):
        if line.startswith('{"'):
            try:
                result.update(json.loads(line))
                break
            except json.JSONDecodeError:
                continue
    return result


# ---------------------------------------------------------------------------- datasets
def make_ct_case(seed: int, small: bool) -> tuple[np.ndarray, np.ndarray, Any]:
    """A CT-like volume (int16 HU) with an organ (1) and lesions (2); air outside an elliptic body."""
    from segpipe.geometry import Geometry

    rng = np.random.default_rng(seed)
    sxy, sz = float(rng.uniform(0.7, 0.9)), float(rng.uniform(2.5, 5.0))
    nxy = 192 if small else 512
    nz = int(rng.integers(40, 56)) if small else int(rng.integers(105, 136))
    if small:
        sxy *= 512 / 192  # same field of view, coarser grid
    shape = (nz, nxy, nxy)
    geo = Geometry(shape=shape, spacing=(sz, sxy, sxy), origin=(0.0, 0.0, 0.0))
    z = ((np.arange(nz, dtype=np.float32) - nz / 2) * sz)[:, None, None]
    y = ((np.arange(nxy, dtype=np.float32) - nxy / 2) * sxy)[None, :, None]
    x = ((np.arange(nxy, dtype=np.float32) - nxy / 2) * sxy)[None, None, :]
    fov = nxy * sxy
    ax, ay = 0.42 * fov * rng.uniform(0.9, 1.05), 0.30 * fov * rng.uniform(0.9, 1.05)
    body2d = (x / ax) ** 2 + (y / ay) ** 2  # [1, Y, X]
    image = np.full(shape, -1000, dtype=np.int16)
    body = np.broadcast_to(body2d < 1.0, shape)
    image[body] = 40
    image[np.broadcast_to((body2d < 1.0) & (body2d > 0.85), shape)] = -100  # fat rim
    spine = np.broadcast_to((x / 14) ** 2 + ((y - 0.6 * ay) / 14) ** 2 < 1.0, shape)
    image[spine] = 700
    c = rng.uniform([-30, -30, -20], [30, 10, 20])
    r = rng.uniform([60, 50, 40], [90, 70, 55])  # organ semi-axes (z, y, x) in mm
    organ = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2] - 0.2 * ax) / r[2]) ** 2 < 1.0
    label = np.zeros(shape, dtype=np.uint8)
    label[organ] = 1
    image[organ] = 60
    for _ in range(int(rng.integers(1, 4))):
        lc = c + rng.uniform(-0.5, 0.5, 3) * r
        lr = rng.uniform(6, 15)
        les = ((z - lc[0]) ** 2 + (y - lc[1]) ** 2 + (x - lc[2] - 0.2 * ax) ** 2 < lr**2) & organ
        label[les] = 2
        image[les] = 100
    noise = rng.normal(0, 15, size=shape).astype(np.float32)
    image = np.where(body, image + noise, image).astype(np.int16)
    return image, label, geo


def write_nnunet_raw(
    root: Path, cases: dict[str, tuple[Path, Path]] | None, *, channel: str, labels: dict[str, int]
) -> None:
    """nnU-Net v2 raw layout; ``cases`` maps case id -> (image, label) files to symlink."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(exist_ok=True)
    if cases:
        for cid, (img, lab) in cases.items():
            for src, dst in (
                (img, root / "imagesTr" / f"{cid}_0000.nii.gz"),
                (lab, root / "labelsTr" / f"{cid}.nii.gz"),
            ):
                if not dst.exists():
                    dst.symlink_to(src)
    n = len(list((root / "labelsTr").glob("*.nii.gz")))
    desc = {
        "channel_names": {"0": channel},
        "labels": labels,
        "numTraining": n,
        "file_ending": ".nii.gz",
        "name": root.name,
    }
    (root / "dataset.json").write_text(json.dumps(desc, indent=1))


def prepare_ct(raw: Path, n: int, small: bool) -> Path:
    from segpipe.io.image import write_image

    write_nnunet_raw(raw, None, channel="CT", labels={"background": 0, "organ": 1, "lesion": 2})
    for i in range(n):
        cid = f"ct_{i:03d}"
        if (raw / "labelsTr" / f"{cid}.nii.gz").exists():
            continue
        image, label, geo = make_ct_case(1000 + i, small)
        write_image(raw / "imagesTr" / f"{cid}_0000.nii.gz", image, geo)
        write_image(raw / "labelsTr" / f"{cid}.nii.gz", label, geo)
    write_nnunet_raw(raw, None, channel="CT", labels={"background": 0, "organ": 1, "lesion": 2})
    return raw


def prepare_hippocampus(raw: Path) -> Path:
    ids = sorted(p.name[: -len(".nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*.nii.gz"))
    cases = {c: (HIPPOCAMPUS / "imagesTr" / f"{c}.nii.gz", HIPPOCAMPUS / "labelsTr" / f"{c}.nii.gz") for c in ids}
    write_nnunet_raw(raw, cases, channel="MRI", labels={"background": 0, "anterior": 1, "posterior": 2})
    return raw


# ---------------------------------------------------------------------------- plans
def spec_from_nnunet(plans_path: Path) -> dict[str, Any]:
    plans = json.loads(plans_path.read_text())
    cfg = plans["configurations"]["3d_fullres"]
    props = plans.get("foreground_intensity_properties_per_channel", {})
    norms = []
    for c, (scheme, mask) in enumerate(zip(cfg["normalization_schemes"], cfg["use_mask_for_norm"])):
        if scheme == "CTNormalization":
            p = props[str(c)]
            norms.append(
                {
                    "scheme": "ct",
                    "clip": [p["percentile_00_5"], p["percentile_99_5"]],
                    "mean": p["mean"],
                    "std": p["std"],
                }
            )
        else:
            norms.append({"scheme": "zscore", "use_mask": bool(mask)})
    return {
        "spacing": cfg["spacing"],
        "transpose": plans["transpose_forward"],
        "norm": norms,
        "patch_size": cfg["patch_size"],
        "batch_size": cfg["batch_size"],
        "source": "nnU-Net plan",
    }


def spec_from_segpipe(dataset_dir: Path, workers: int) -> dict[str, Any]:
    from segpipe.fingerprint import compute_fingerprint
    from segpipe.io.datasets import load_dataset
    from segpipe.planning import make_plan

    plan = make_plan(compute_fingerprint(load_dataset(dataset_dir), num_workers=workers))
    cfg = plan.config("3d_fullres")
    norms = [
        {"scheme": n.scheme, "use_mask": n.use_mask, "clip": n.clip, "mean": n.mean, "std": n.std}
        for n in plan.normalization
    ]
    return {
        "spacing": cfg.spacing,
        "transpose": plan.transpose_forward,
        "norm": norms,
        "patch_size": cfg.patch_size,
        "batch_size": cfg.batch_size,
        "source": "segpipe plan",
    }


# ---------------------------------------------------------------------------- child scripts
SEGPIPE_PREPROCESS = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
from segpipe.io.datasets import load_dataset
from segpipe.preprocessing import ChannelNorm, PreprocessSpec, preprocess_dataset
a = json.loads(sys.argv[1])
spec = PreprocessSpec(spacing=tuple(a["spacing"]), transpose=tuple(a["transpose"]),
                      normalization=tuple(ChannelNorm.from_dict(n) for n in a["norm"]))
t = time.perf_counter()
r = preprocess_dataset(load_dataset(a["dataset"]), spec, a["cache"], num_workers=a["workers"], force=True)
print(json.dumps({"inner_s": round(time.perf_counter() - t, 2), "cases": len(r.processed)}))
"""

SEGPIPE_LOADER = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import torch
from segpipe.data import SegDataModule, fold_cases, make_splits
from segpipe.preprocessing import Cache
a = json.loads(sys.argv[1])
ids = Cache(a["cache"]).cases()
train, _ = fold_cases(make_splits(ids), 0)  # nnU-Net's loader serves fold 0's training cases too
dm = SegDataModule(a["cache"], train, [], patch_size=a["patch_size"], batch_size=a["batch_size"],
                   num_workers=a["workers"], seed=0)
it = iter(dm.train_dataloader())
for _ in range(a["warmup"]):
    b = next(it)
t = time.perf_counter()
for _ in range(a["batches"]):
    b = next(it)
dt = time.perf_counter() - t
print(json.dumps({"batches_per_s": round(a["batches"] / dt, 2), "image_shape": list(b["image"].shape)}))
"""

NNUNET_LOADER = r"""
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
from batchgenerators.utilities.file_and_folder_operations import join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
name, warm, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pre = join(nnUNet_preprocessed, name)
plans = load_json(join(pre, "nnUNetPlans.json"))
plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args adds
tr = nnUNetTrainer(plans, "3d_fullres", 0, load_json(join(pre, "dataset.json")), device=torch.device("cpu"))
tr.initialize()
dl_tr, dl_val = tr.get_dataloaders()
for _ in range(warm):
    b = next(dl_tr)
t = time.perf_counter()
for _ in range(n):
    b = next(dl_tr)
dt = time.perf_counter() - t
print(json.dumps({"batches_per_s": round(n / dt, 2), "image_shape": list(b["data"].shape)}), flush=True)
for g in (dl_tr, dl_val):
    try:
        g._finish()
    except Exception:
        pass
os._exit(0)
"""


# ---------------------------------------------------------------------------- one dataset
def bench_dataset(name: str, raw: Path, dataset_id: int, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"dataset": name, "cases": len(list((raw / "labelsTr").glob("*.nii.gz")))}
    w = args.workers
    nn_env = None
    if args.nnunet_python:
        nn_bin = Path(args.nnunet_python).parent
        nn_env = {
            "nnUNet_raw": str(work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
            "nnUNet_results": str(work / "nnUNet_results"),
            "nnUNet_n_proc_DA": str(w),
            "nnUNet_compile": "f",
            "OMP_NUM_THREADS": "1",
        }
        ds_name = raw.name
        pre = work / "nnUNet_preprocessed" / ds_name
        if not (pre / "nnUNetPlans.json").is_file():
            print(f"[{name}] nnU-Net fingerprint + plan ...", flush=True)
            res["nnunet_fingerprint"] = run_measured(
                [str(nn_bin / "nnUNetv2_extract_fingerprint"), "-d", str(dataset_id), "-np", str(w)],
                nn_env,
                label="nnUNetv2_extract_fingerprint",
            )
            res["nnunet_plan"] = run_measured(
                [str(nn_bin / "nnUNetv2_plan_experiment"), "-d", str(dataset_id)],
                nn_env,
                label="nnUNetv2_plan_experiment",
            )
        print(f"[{name}] nnU-Net preprocess ...", flush=True)
        res["nnunet_preprocess"] = run_measured(
            [str(nn_bin / "nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres", "-np", str(w)],
            nn_env,
            label="nnUNetv2_preprocess",
        )
        spec = spec_from_nnunet(pre / "nnUNetPlans.json")
    else:
        spec = spec_from_segpipe(raw, w)
    res["plan"] = {k: spec[k] for k in ("spacing", "transpose", "patch_size", "batch_size", "source")}

    cache = work / "segpipe_cache" / name
    if cache.exists():
        shutil.rmtree(cache)
    print(f"[{name}] segpipe preprocess ...", flush=True)
    job = {**spec, "dataset": str(raw), "cache": str(cache), "workers": w}
    res["segpipe_preprocess"] = run_measured(
        [sys.executable, "-c", SEGPIPE_PREPROCESS, json.dumps(job), str(REPO)],
        {"OMP_NUM_THREADS": "1"},
        label="segpipe preprocess",
    )

    print(f"[{name}] segpipe loader ...", flush=True)
    job = {
        "cache": str(cache),
        "patch_size": spec["patch_size"],
        "batch_size": spec["batch_size"],
        "workers": w,
        "warmup": args.warmup,
        "batches": args.batches,
    }
    res["segpipe_loader"] = run_measured(
        [sys.executable, "-c", SEGPIPE_LOADER, json.dumps(job), str(REPO)], label="segpipe loader"
    )
    if args.nnunet_python:
        print(f"[{name}] nnU-Net loader ...", flush=True)
        res["nnunet_loader"] = run_measured(
            [args.nnunet_python, "-c", NNUNET_LOADER, raw.name, str(args.warmup), str(args.batches)],
            nn_env,
            label="nnU-Net loader",
        )
        pp_n, pp_s = res["nnunet_preprocess"], res["segpipe_preprocess"]
        res["ratios"] = {
            "preprocess_speedup": round(pp_n["wall_s"] / pp_s["wall_s"], 2),
            "preprocess_rss_fraction": round(pp_s["peak_rss_mb"] / pp_n["peak_rss_mb"], 2),
            "loader_speedup": round(res["segpipe_loader"]["batches_per_s"] / res["nnunet_loader"]["batches_per_s"], 2),
        }
    return res


def print_table(results: list[dict[str, Any]], workers: int) -> None:
    print()
    print(f"{'dataset':<18}{'step':<30}{'segpipe':>12}{'nnU-Net v2':>12}{'ratio':>8}")
    for r in results:
        sp, nn, ratio = r["segpipe_preprocess"], r.get("nnunet_preprocess"), r.get("ratios", {})
        sl, nl = r["segpipe_loader"], r.get("nnunet_loader")
        rows = [
            (
                f"preprocess wall s (-np {workers})",
                f"{sp['wall_s']:.1f}",
                f"{nn['wall_s']:.1f}" if nn else "-",
                f"{ratio['preprocess_speedup']:.2f}x" if ratio else "",
            ),
            (
                "preprocess peak RSS MB (tree)",
                f"{sp['peak_rss_mb']}",
                f"{nn['peak_rss_mb']}" if nn else "-",
                f"{ratio['preprocess_rss_fraction']:.2f}" if ratio else "",
            ),
            (
                f"augmented batches/s ({workers} workers)",
                f"{sl['batches_per_s']:.2f}",
                f"{nl['batches_per_s']:.2f}" if nl else "-",
                f"{ratio['loader_speedup']:.2f}x" if ratio else "",
            ),
        ]
        for i, (step, a, b, c) in enumerate(rows):
            name = f"{r['dataset']} ({r['cases']})" if i == 0 else ""
            print(f"{name:<18}{step:<30}{a:>12}{b:>12}{c:>8}")
        p = r["plan"]
        print(
            f"{'':<18}plan ({p['source']}): spacing {[round(v, 3) for v in p['spacing']]}, "
            f"patch {p['patch_size']}, batch {p['batch_size']}"
        )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nnunet-python", help="python of a venv with nnunetv2 installed (runs nnU-Net's side)")
    ap.add_argument("--workers", type=int, default=2, help="processes for preprocessing and data loading (2)")
    ap.add_argument("--ct-cases", type=int, default=12, help="generated CT-like cases (12; 0 skips the CT set)")
    ap.add_argument("--ct-small", action="store_true", help="192x192x~48 CT-like cases instead of 512x512x~120")
    ap.add_argument("--no-hippocampus", action="store_true", help="skip the hippocampus data")
    ap.add_argument("--batches", type=int, default=100, help="timed batches (100)")
    ap.add_argument("--warmup", type=int, default=20, help="warm-up batches (20)")
    ap.add_argument("--work-dir", help="where everything is written (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.nnunet_python:
        probe = subprocess.run([args.nnunet_python, "-c", "import nnunetv2"], capture_output=True)
        if probe.returncode != 0:
            print(f"nnunetv2 not importable with {args.nnunet_python}; running segpipe's side only", file=sys.stderr)
            args.nnunet_python = None
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    raw_root = work / "nnUNet_raw"
    results = []
    try:
        if not args.no_hippocampus:
            if (HIPPOCAMPUS / "imagesTr").is_dir():
                raw = prepare_hippocampus(raw_root / "Dataset987_BenchHippocampus")
                results.append(bench_dataset("hippocampus", raw, 987, work, args))
            else:
                print(f"hippocampus data not found at {HIPPOCAMPUS}; skipped", file=sys.stderr)
        if args.ct_cases > 0:
            tag = "small" if args.ct_small else "full"
            ct_id = 988 if tag == "full" else 989
            raw = raw_root / f"Dataset{ct_id}_BenchCT{tag.capitalize()}{args.ct_cases}"
            print(f"[ct] generating {args.ct_cases} {tag} CT-like cases (reused when kept) ...", flush=True)
            t = time.perf_counter()
            prepare_ct(raw, args.ct_cases, args.ct_small)
            print(f"[ct] ready in {time.perf_counter() - t:.0f} s", flush=True)
            results.append(bench_dataset(f"ct-{tag}", raw, ct_id, work, args))
    finally:
        if not args.work_dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(results, args.workers)
    if not args.nnunet_python:
        print("\n(nnU-Net's side not measured: pass --nnunet-python PATH)")
    if args.json:
        Path(args.json).write_text(json.dumps({"workers": args.workers, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
