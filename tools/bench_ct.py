#!/usr/bin/env python
"""Benchmark one CT end to end at 3 mm: segpipe (OpenVINO, PyTorch) against nnU-Net v2, on 2 CPU threads.

The case: a synthetic CT-like volume of 512×512×300 voxels (x, y, z) at 0.8×0.8×1.5 mm, int16
HU-like values (air −1000 outside a body ellipse, fat, soft tissue ~40 with noise, lungs, organ-like
ellipsoids of their own HU, a spine and rib-like "bone" blobs ~700), written as ``case_0000.nii.gz``
with an LPS-oriented affine. The model: a plan whose ``3d_fullres`` configuration resamples to 3 mm
isotropic (the volume becomes ~150×137×137), CT normalisation, 12 classes (background + 11), a
6-stage U-Net (strides 1, 2, 2, 2, 2, 2; features 32, 64, 128, 256, 320, 320 as nnU-Net's; patch
128³), random weights (weights do not change speed), saved as a model folder (``segpipe export``'s
format, with the network stored converted for OpenVINO as ``segpipe export runtime=openvino`` stores
it, so that a run loads it without converting) and, for nnU-Net, as TorchScript with a hand-made nnU-Net plan of the same spacing, patch
and CT normalisation.

Each side runs in its own process with 2 threads, overlap 0.5, Gaussian weighting:

1. ``openvino``: segpipe's ``Predictor.from_model(model, runtime="openvino", tta=False).prepare()``
   (loading the model folder and its stored OpenVINO network, timed apart as ``load``), then
   ``infer_cases`` on the image; one window per pass (segpipe's default on a CPU) unless ``--batch-size``;
2. ``torch``: the same with ``runtime="torch"``;
3. ``nnunet``: ``nnUNetPredictor(use_mirroring=False).manual_initialization(...)`` (``load``),
   then ``predict_from_files`` (``nnUNet_def_n_proc=2``, one window at a time), with nnU-Net's Python.

With ``--flips`` the same three run again with all 8 flips (``tta=True``, ``use_mirroring=True``).
The headline figure, ``predict s``, is the NIfTI on disk to the label map written on disk: reading,
preprocessing (normalisation, resampling to 3 mm), the sliding window, resampling back to the
0.8×0.8×1.5 mm grid, writing; segpipe's stages come from its per-case report. ``peak RSS`` is the
process tree's (sampled every 20 ms), loading included; ``load MB`` and ``predict MB`` are the main
process's own peaks (VmHWM) while loading and while predicting, which tell a peak of the conversion
(or of processes forked then) from one of the prediction. With ``--rounds N`` the sides run
interleaved (A, B, C, A, B, C) and each side's median counts. Targets: ``openvino`` without flips
under 120 s, each segpipe side's peak RSS under 4 GB (the exit status is 1 when one is missed). The
label maps of the sides are compared voxel by voxel (random weights: segpipe's two runtimes should
agree closely; nnU-Net interpolates with its own splines, and resamples logits rather than
probabilities).

    python tools/bench_ct.py --nnunet-python ../nnunet-venv/bin/python --json ct.json
    python tools/bench_ct.py --sides openvino,torch                      # segpipe only
    python tools/bench_ct.py --flips --rounds 3 --nnunet-python ../nnunet-venv/bin/python
    python tools/bench_ct.py --shape 128x128x80 --patch 64x64x64 --classes 4 --work /tmp/ct   # a quick check

Run time on 2 cores (8 windows of 128³ at 3 mm; ~6 s a window in OpenVINO, ~11 s in PyTorch):
about 2 minutes a segpipe side without flips (OpenVINO's conversion ~1 minute of it), nnU-Net
several minutes (it resamples 12 full-size logit maps back); with ``--flips`` the network's share
grows eightfold: ~45 minutes for all six runs of one round.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_infer import nnunet_ct_plans  # noqa: E402
from bench_plan import run_measured  # noqa: E402

THREADS = 2
SHAPE_XYZ = (512, 512, 300)
SPACING_XYZ = (0.8, 0.8, 1.5)  # mm
TARGET_SPACING = 3.0  # mm, isotropic
CLASSES = 12
PATCH_ZYX = (128, 128, 128)
FEATURES = (32, 64, 128, 256, 320, 320)
STRIDES = [[1, 1, 1]] + [[2, 2, 2]] * 5
BATCH_SIZE = 2
DIVISOR = 2 ** (len(STRIDES) - 1)  # a patch's every axis must be a multiple of it
# CT normalisation of both tools: clip to the foreground's 0.5-99.5 percentiles, then z-score
CT_NORM = {"mean": 40.0, "std": 250.0, "clip": [-850.0, 800.0]}
TARGET_SECONDS = 120.0  # segpipe-openvino without flips
TARGET_RSS_MB = 4096.0  # each segpipe side
SIDES = ("openvino", "torch", "nnunet")

# the main process's own peak RSS (VmHWM, Linux): while loading, then of the prediction alone ("5" to
# clear_refs resets it); a new process's own, unlike ru_maxrss, which a forked child inherits
HWM_SNIPPET = r"""
def hwm_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
def hwm_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
"""

SEGPIPE_SNIPPET = (
    HWM_SNIPPET
    + r"""
import json, sys, time
import torch
model, images, out, threads, runtime, tta, overlap, batch = sys.argv[1:9]
torch.set_num_threads(int(threads))
from segpipe.inference import Predictor, discover_inputs, infer_cases
t0 = time.perf_counter()
predictor = Predictor.from_model(model, device="cpu", tta=tta == "1", overlap=float(overlap), runtime=runtime,
                                 batch_size=None if batch == "plan" else int(batch)).prepare()
load = time.perf_counter() - t0
rss_load = hwm_mb()
reset = hwm_reset()
cases = discover_inputs(images)
t1 = time.perf_counter()
res = infer_cases(predictor, cases, out, overwrite=True)
wall = time.perf_counter() - t1
rss_predict = hwm_mb() if reset else None
assert not res["failed"], res["failed"]
report = json.loads((__import__("pathlib").Path(out) / (res["written"][0] + ".json")).read_text())
print("RESULT " + json.dumps({"load_s": load, "predict_s": wall, "load_peak_rss_mb": rss_load,
                              "predict_peak_rss_mb": rss_predict, "runtime": predictor.runtime, "case_seconds": report["seconds"],
                              "timings": report["timings"]}))
"""
)

NNUNET_SNIPPET = (
    HWM_SNIPPET
    + r"""
import json, sys, time
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
ts, plans_path, dataset_json, image, out, threads, overlap, mirror = sys.argv[1:9]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
net = torch.jit.load(ts, map_location="cpu").eval()
plans = PlansManager(load_json(plans_path))
conf = plans.get_configuration("3d_fullres")
predictor = nnUNetPredictor(tile_step_size=1.0 - float(overlap), use_gaussian=True, use_mirroring=mirror == "1",
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
predictor.manual_initialization(net, plans, conf, [net.state_dict()], load_json(dataset_json), "nnUNetTrainer",
                                (0, 1, 2) if mirror == "1" else None)
load = time.perf_counter() - t0
rss_load = hwm_mb()
reset = hwm_reset()
t1 = time.perf_counter()
predictor.predict_from_files([[image]], out, save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
wall = time.perf_counter() - t1
rss_predict = hwm_mb() if reset else None
print("RESULT " + json.dumps({"load_s": load, "predict_s": wall, "load_peak_rss_mb": rss_load,
                              "predict_peak_rss_mb": rss_predict, "patch_size": list(conf.patch_size)}))
"""
)


def _say(text: str) -> None:
    print(text, flush=True)


def _triple(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().replace("×", "x").split("x")]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three sizes such as 512x512x300")
    return parts[0], parts[1], parts[2]


def _sides(text: str) -> list[str]:
    sides = [s.strip() for s in text.split(",") if s.strip()]
    wrong = [s for s in sides if s not in SIDES]
    if wrong or not sides:
        raise argparse.ArgumentTypeError(f"{text!r}: sides are {', '.join(SIDES)} (comma-separated)")
    return sides


def grid_shape_zyx(shape_xyz: tuple[int, int, int]) -> list[int]:
    """The image's shape (z, y, x) on the 3 mm grid (rounded as both tools round)."""
    x, y, z = shape_xyz
    sx, sy, sz = SPACING_XYZ
    return [round(n * s / TARGET_SPACING) for n, s in ((z, sz), (y, sy), (x, sx))]


# ---------------------------------------------------------------------------- the case
def ct_volume(shape_xyz: tuple[int, int, int], seed: int = 0) -> Any:
    """A CT-like int16 volume [Z, Y, X] in HU: air outside a body ellipse, subcutaneous fat, soft
    tissue ~40 with noise, two lungs, organ-like ellipsoids, a spine and rib-like bone blobs ~700."""
    import numpy as np

    rng = np.random.default_rng(seed)
    nx, ny, nz = shape_xyz
    # normalised coordinates in [-1, 1] on every axis (y grows towards the back, z towards the head)
    u = np.linspace(-1.0, 1.0, nx, dtype=np.float32)[None, :]
    v = np.linspace(-1.0, 1.0, ny, dtype=np.float32)[:, None]
    # (name, HU, centre (x, y, z), semi-axes (x, y, z)); later ones are painted over earlier ones
    ellipsoids: list[tuple[str, float, tuple[float, float, float], tuple[float, float, float]]] = [
        ("right lung", -850, (-0.42, -0.05, 0.55), (0.3, 0.45, 0.5)),
        ("left lung", -850, (0.42, -0.05, 0.55), (0.28, 0.45, 0.5)),
        ("heart", 45, (0.12, -0.2, 0.35), (0.25, 0.25, 0.22)),
        ("liver", 60, (-0.4, -0.05, -0.2), (0.38, 0.45, 0.3)),
        ("spleen", 50, (0.5, 0.2, -0.15), (0.15, 0.2, 0.2)),
        ("stomach", 20, (0.25, -0.3, -0.1), (0.2, 0.15, 0.15)),
        ("pancreas", 35, (0.1, 0.1, -0.35), (0.25, 0.08, 0.08)),
        ("right kidney", 150, (-0.32, 0.4, -0.45), (0.1, 0.14, 0.2)),
        ("left kidney", 150, (0.32, 0.4, -0.42), (0.1, 0.14, 0.2)),
        ("bladder", 5, (0.0, -0.1, -0.88), (0.22, 0.2, 0.1)),
        ("aorta", 180, (0.06, 0.42, 0.0), (0.05, 0.05, 2.0)),
        ("spine", 700, (0.0, 0.62, 0.0), (0.09, 0.1, 2.0)),
    ]
    for _ in range(24):  # rib-like bone blobs along the body's rim
        angle = rng.uniform(0.0, 2.0 * np.pi)
        cz = rng.uniform(-0.2, 0.95)
        centre = (0.86 * np.cos(angle), 0.78 * np.sin(angle), cz)
        ellipsoids.append(("rib", float(rng.uniform(600, 900)), centre, (0.06, 0.06, 0.03)))
    vol = np.empty((nz, ny, nx), dtype=np.int16)
    for k, w in enumerate(np.linspace(-1.0, 1.0, nz)):
        rx, ry = 0.94 - 0.06 * w**2, 0.8 - 0.05 * w**2  # the body narrows towards both ends
        r2 = (u / rx) ** 2 + (v / ry) ** 2
        sl = np.where(r2 <= 1.0, 40.0, -1000.0).astype(np.float32)
        sl[(r2 <= 1.0) & (r2 > 0.86)] = -100.0  # subcutaneous fat
        for _name, hu, (cx, cy, cz), (ax, ay, az) in ellipsoids:
            dz = ((w - cz) / az) ** 2
            if dz >= 1.0:
                continue
            inside = ((u - cx) / ax) ** 2 + ((v - cy) / ay) ** 2 <= 1.0 - dz
            sl[inside & (r2 <= 1.0)] = hu
        sl += rng.standard_normal((ny, nx), dtype=np.float32) * np.where(sl > -950, 20.0, 5.0).astype(np.float32)
        vol[k] = np.clip(np.rint(sl), -1024, 3071).astype(np.int16)
    return vol


def setup(
    work: Path, shape_xyz: tuple[int, int, int], classes: int, patch: tuple[int, int, int], nnunet: bool
) -> dict[str, Path]:
    """Write the case, the segpipe model folder and, for nnU-Net, the TorchScript network, plans and
    dataset.json (not timed); what a kept ``--work`` folder already holds for the same settings is reused."""
    sys.path.insert(0, str(REPO))
    import torch

    from segpipe.checkpoint import save_checkpoint
    from segpipe.geometry import Geometry
    from segpipe.inference.model import Member, Model, export_model
    from segpipe.io.image import write_image
    from segpipe.networks import build_network
    from segpipe.planning import Plan

    work.mkdir(parents=True, exist_ok=True)
    settings = {"shape_xyz": list(shape_xyz), "classes": classes, "patch_zyx": list(patch), "seed": 0}
    stamp = work / "setup.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == settings):
        for name in ("images", "model", "network.ts", "nnUNetPlans.json", "dataset.json", "fold_0.pt"):
            target = work / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
        stamp.unlink(missing_ok=True)
    paths = {
        "images": work / "images",
        "image": work / "images" / "case_0000.nii.gz",
        "model": work / "model",
        "ts": work / "network.ts",
        "nn_plans": work / "nnUNetPlans.json",
        "dataset_json": work / "dataset.json",
    }
    nx, ny, nz = shape_xyz
    shape_zyx = [nz, ny, nx]
    spacing_zyx = [SPACING_XYZ[2], SPACING_XYZ[1], SPACING_XYZ[0]]
    if not paths["image"].is_file():
        t = time.perf_counter()
        paths["images"].mkdir(exist_ok=True)
        vol = ct_volume(shape_xyz)
        sx, sy, sz = SPACING_XYZ
        # LPS, as a CT scanner writes it: x to the patient's left, y to the back, z to the head
        origin = (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2 + 30.0, -600.0)
        write_image(paths["image"], vol, Geometry(shape=tuple(shape_zyx), spacing=tuple(spacing_zyx), origin=origin))
        del vol
        _say(f"  case written in {time.perf_counter() - t:.0f} s: {paths['image']}")
    grid = grid_shape_zyx(shape_xyz)
    spacing = [TARGET_SPACING] * 3
    labels = {str(i): ("background" if i == 0 else f"structure_{i}") for i in range(classes)}
    n = len(STRIDES)
    plan = Plan.from_dict(
        {
            "schema_version": 1,
            "dataset": "ct3mm",
            "fingerprint_sha256": "0" * 64,
            "anisotropic": False,
            "anisotropic_axis": None,
            "channel_names": {"0": "CT"},
            "labels": labels,
            "median_shape": shape_zyx,
            "median_spacing": spacing_zyx,
            "target_spacing": spacing,
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "normalization": [{"channel": 0, "name": "CT", "scheme": "ct", **CT_NORM}],
            "configurations": {
                "3d_fullres": {
                    "name": "3d_fullres",
                    "architecture": "unet",
                    "dims": 3,
                    "spacing": spacing,
                    "median_shape": grid,
                    "patch_size": list(patch),
                    "batch_size": BATCH_SIZE,
                    "strides": STRIDES,
                    "kernel_sizes": [[3, 3, 3]] * n,
                    "features": list(FEATURES),
                    "n_conv_encoder": [2] * n,
                    "n_conv_decoder": [2] * (n - 1),
                    "resample_slices": True,
                    "data_identifier": "3d_ct3mm",
                }
            },
        }
    )
    cfg = plan.config("3d_fullres")
    net = None
    if not (paths["model"] / "model.json").is_file() or (nnunet and not paths["ts"].is_file()):
        torch.manual_seed(0)
        net = build_network(cfg, 1, classes, deep_supervision=True).eval()
        weights = work / "fold_0.pt"
        save_checkpoint(weights, {"model": net.state_dict()})
        # as a site deploys it: the network also stored converted for OpenVINO (segpipe export runtime=openvino)
        openvino = importlib.util.find_spec("openvino") is not None
        export_model(
            Model(plan, [Member("3d_fullres", "0", weights)]), paths["model"], overwrite=True, openvino=openvino
        )
    if nnunet and not paths["ts"].is_file():
        t = time.perf_counter()
        assert net is not None
        with torch.no_grad():
            scripted = torch.jit.trace(net, torch.zeros((1, 1, *patch)), check_trace=False)
        scripted.save(str(paths["ts"]))
        _say(f"  TorchScript traced in {time.perf_counter() - t:.0f} s")
    del net
    # nnU-Net's plan: the same spacing, patch and CT normalisation (its clip and statistics are ours)
    lo, hi = CT_NORM["clip"]
    nn_plans = nnunet_ct_plans(
        "Dataset997_ct3mm",
        spacing=spacing,
        shape=grid,
        patch=list(patch),
        intensity={"min": lo, "max": hi, "mean": CT_NORM["mean"], "median": CT_NORM["mean"], "std": CT_NORM["std"]},
        original=(spacing_zyx, shape_zyx),
    )
    paths["nn_plans"].write_text(json.dumps(nn_plans, indent=1))
    paths["dataset_json"].write_text(
        json.dumps(
            {
                "channel_names": {"0": "CT"},
                "labels": {v: int(k) for k, v in labels.items()},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            },
            indent=1,
        )
    )
    stamp.write_text(json.dumps(settings))
    return paths


# ---------------------------------------------------------------------------- the sides
def _result(measured: dict[str, Any], step: str) -> dict[str, Any]:
    if measured["returncode"] != 0:
        raise RuntimeError(f"{step} failed (exit {measured['returncode']}):\n{measured['output_tail']}")
    line = next(ln for ln in reversed(measured["output_tail"].splitlines()) if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    out["wall_s"] = measured["wall_s"]
    out["peak_rss_mb"] = measured["peak_rss_mb"]
    return out


def run_segpipe(
    paths: dict[str, Path], out: Path, runtime: str, flips: bool, overlap: float, batch_size: int | None = None
) -> dict[str, Any]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": str(THREADS),
    }
    cmd = [sys.executable, "-c", SEGPIPE_SNIPPET, str(paths["model"]), str(paths["images"]), str(out)]
    cmd += [
        str(THREADS),
        runtime,
        "1" if flips else "0",
        str(overlap),
        "plan" if batch_size is None else str(batch_size),
    ]
    return _result(run_measured(cmd, env=env, cwd=REPO), f"segpipe runtime={runtime}")


def run_nnunet(
    python: Path, paths: dict[str, Path], work: Path, out: Path, flips: bool, overlap: float
) -> dict[str, Any]:
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_compile": "False",
        "nnUNet_def_n_proc": str(THREADS),
        "OMP_NUM_THREADS": str(THREADS),
    }
    cmd = [str(python), "-c", NNUNET_SNIPPET, str(paths["ts"]), str(paths["nn_plans"]), str(paths["dataset_json"])]
    cmd += [str(paths["image"]), str(out), str(THREADS), str(overlap), "1" if flips else "0"]
    return _result(run_measured(cmd, env=env), "nnU-Net")


def compare(a: Path, b: Path) -> dict[str, Any] | None:
    """Voxel agreement of two label maps, and how many classes each holds (1 class: trivially equal)."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from segpipe.io.image import read_image

    if not (a.is_file() and b.is_file()):
        return None
    la, ga = read_image(a)
    lb, gb = read_image(b)
    if la.shape != lb.shape:
        return {"agreement": 0.0, "note": f"shapes differ: {la.shape} vs {lb.shape}"}
    return {
        "agreement": float(np.count_nonzero(la == lb)) / la.size,
        "classes_present": [int(np.unique(la).size), int(np.unique(lb).size)],
        "same_grid": ga.same_grid(gb),
    }


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run of median predict seconds (the upper one of an even count), with the rounds' figures."""
    ordered = sorted(runs, key=lambda r: r["predict_s"])
    mid = ordered[len(ordered) // 2]
    return {
        **mid,
        "predict_s_median": statistics.median(r["predict_s"] for r in runs),
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
        "rounds": runs,
    }


def _stages(run: dict[str, Any]) -> str:
    t = run.get("timings")
    if not t:
        return ""
    write = run["predict_s"] - run.get("case_seconds", run["predict_s"])
    parts = [f"{k} {t[k]:.1f}" for k in ("read", "preprocess", "network", "restore", "postprocess") if k in t]
    return ", ".join([*parts, f"write {write:.1f}"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnunet-python", type=Path, default=None, help="a Python with nnunetv2 (nnU-Net skipped without)")
    ap.add_argument(
        "--sides", type=_sides, default=list(SIDES), help="comma-separated: openvino,torch,nnunet (default all)"
    )
    ap.add_argument("--flips", action="store_true", help="also run every side with all 8 flips (TTA)")
    ap.add_argument("--flips-only", action="store_true", help="run every side with all 8 flips only")
    ap.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds of every side; the median counts (default 1)"
    )
    ap.add_argument("--shape", type=_triple, default=SHAPE_XYZ, help="the CT's voxels x, y, z (default 512x512x300)")
    ap.add_argument("--classes", type=int, default=CLASSES, help=f"classes, background included (default {CLASSES})")
    ap.add_argument(
        "--patch",
        type=_triple,
        default=PATCH_ZYX,
        help=f"window z, y, x, each a multiple of {DIVISOR} (default 128x128x128)",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="segpipe's windows per forward pass (default: segpipe's own, one on a CPU; nnU-Net runs one at a time)",
    )
    ap.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    ap.add_argument(
        "--work", type=Path, default=None, help="keep the work folder here (reused when its settings match)"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    if any(p % DIVISOR for p in a.patch):
        ap.error(f"--patch {a.patch}: every size must be a multiple of {DIVISOR} (5 poolings)")
    if a.classes < 2:
        ap.error("--classes must be at least 2")
    if a.batch_size is not None and a.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    if not 0.0 <= a.overlap < 1.0:
        ap.error("--overlap must be in [0, 1)")
    sides = list(a.sides)
    if "nnunet" in sides and (a.nnunet_python is None or not a.nnunet_python.exists()):
        why = "no --nnunet-python" if a.nnunet_python is None else f"{a.nnunet_python} does not exist"
        _say(f"nnU-Net: skipped ({why})")
        sides.remove("nnunet")
    if not sides:
        ap.error("no side left to run")
    runs_of = ([] if a.flips_only else [(side, False) for side in sides]) + (
        [(side, True) for side in sides] if a.flips or a.flips_only else []
    )
    names = [f"{side}{'+flips' if flips else ''}" for side, flips in runs_of]

    tmp_ctx = tempfile.TemporaryDirectory(prefix="segpipe-bench-ct-") if a.work is None else None
    work = Path(tmp_ctx.name) if tmp_ctx is not None else a.work
    grid = grid_shape_zyx(a.shape)
    result: dict[str, Any] = {
        "threads": THREADS,
        "shape_xyz": list(a.shape),
        "spacing_xyz": list(SPACING_XYZ),
        "target_spacing": TARGET_SPACING,
        "grid_zyx": grid,
        "classes": a.classes,
        "patch_zyx": list(a.patch),
        "features": list(FEATURES),
        "overlap": a.overlap,
        "segpipe_batch_size": "default (1 on a CPU)" if a.batch_size is None else a.batch_size,
        "rounds": a.rounds,
        "cpu_count": os.cpu_count(),
    }
    try:
        _say(
            f"setup (not timed): a CT of {'x'.join(map(str, a.shape))} voxels at "
            f"{'x'.join(map(str, SPACING_XYZ))} mm (x, y, z), {grid[2]}x{grid[1]}x{grid[0]} at {TARGET_SPACING:g} mm; "
            f"{a.classes} classes, {len(STRIDES)}-stage U-Net {list(FEATURES)}, patch {'x'.join(map(str, a.patch))}"
        )
        paths = setup(work, a.shape, a.classes, a.patch, "nnunet" in sides)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for round_ in range(1, a.rounds + 1):  # interleaved: the machine's speed drifts between runs
            for name, (side, flips) in zip(names, runs_of, strict=True):
                out = work / f"out_{name.replace('+', '_')}"
                what = "8 flips" if flips else "no flips"
                if side == "nnunet":
                    _say(f"round {round_}: nnU-Net nnUNetPredictor.predict_from_files, {what} ...")
                    run = run_nnunet(a.nnunet_python, paths, work, out, flips, a.overlap)
                else:
                    _say(f"round {round_}: segpipe runtime={side}, Predictor.from_model + infer_cases, {what} ...")
                    run = run_segpipe(paths, out, side, flips, a.overlap, a.batch_size)
                runs[name].append(run)
                stages = _stages(run)
                _say(
                    f"  {name}: {run['predict_s']:.1f} s NIfTI to label map (load {run['load_s']:.1f} s apart), "
                    f"peak RSS {run['peak_rss_mb']:.0f} MB" + (f"; {stages}" if stages else "")
                )
        result["sides"] = {name: _median_run(r) for name, r in runs.items()}
        agreement: dict[str, Any] = {}
        for i, x in enumerate(names):
            for y in names[i + 1 :]:
                if x.endswith("+flips") != y.endswith("+flips"):
                    continue
                cmp = compare(
                    work / f"out_{x.replace('+', '_')}" / "case.nii.gz",
                    work / f"out_{y.replace('+', '_')}" / "case.nii.gz",
                )
                if cmp is not None:
                    agreement[f"{x} vs {y}"] = cmp
        result["label_agreement"] = agreement

        width = max(len(n) for n in names)
        _say("")
        _say(
            f"{'side':<{width}}  {'predict s':>9}  {'load s':>6}  {'wall s':>6}  {'peak RSS MB':>11}  "
            f"{'load MB':>7}  {'predict MB':>10}  stages (s)"
        )
        for name in names:
            r = result["sides"][name]
            load_mb, during = r.get("load_peak_rss_mb"), r.get("predict_peak_rss_mb")
            _say(
                f"{name:<{width}}  {r['predict_s_median']:>9.1f}  {r['load_s']:>6.1f}  {r['wall_s']:>6.1f}  "
                f"{r['peak_rss_mb_max']:>11.0f}  {'-' if load_mb is None else f'{load_mb:.0f}':>7}  "
                f"{'-' if during is None else f'{during:.0f}':>10}  {_stages(r)}"
            )
        _say(
            f"predict s: NIfTI read to label map written, median of {a.rounds} round(s); load s: the model loaded "
            "(and converted for OpenVINO), apart; wall s: the whole process, imports included. peak RSS: the process "
            "tree's, loading included, the largest of the rounds; load MB: the main process's peak while loading; "
            "predict MB: the main process's own peak while predicting (nnU-Net's worker processes not included)"
        )
        for pair, cmp in agreement.items():
            if "classes_present" in cmp:
                extra = f", classes present {cmp['classes_present']}"
                extra += "" if cmp["same_grid"] else " (WARNING: the two label maps lie on different grids)"
            else:
                extra = f" ({cmp.get('note')})"
            _say(f"label maps {pair}: {100 * cmp['agreement']:.3f} % of voxels agree{extra}")
        targets: dict[str, Any] = {}
        if "openvino" in result["sides"]:
            s = result["sides"]["openvino"]["predict_s_median"]
            targets["openvino_seconds"] = {"value": s, "target": TARGET_SECONDS, "met": s < TARGET_SECONDS}
        for name in names:
            if not name.startswith("nnunet"):
                m = result["sides"][name]["peak_rss_mb_max"]
                targets[f"{name}_peak_rss_mb"] = {"value": m, "target": TARGET_RSS_MB, "met": m < TARGET_RSS_MB}
        result["targets"] = targets
        for key, t in targets.items():
            _say(f"target {key}: {t['value']:.1f} < {t['target']:.0f}: {'met' if t['met'] else 'NOT met'}")
        if "nnunet" in result["sides"] or "nnunet+flips" in result["sides"]:
            for name in names:
                base = "nnunet+flips" if name.endswith("+flips") else "nnunet"
                if not name.startswith("nnunet") and base in result["sides"]:
                    ratio = result["sides"][base]["predict_s_median"] / result["sides"][name]["predict_s_median"]
                    result["sides"][name]["speedup_vs_nnunet"] = ratio
                    _say(f"{name} is {ratio:.2f}x nnU-Net's speed ({base})")
    finally:
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return 0 if all(t["met"] for t in result.get("targets", {}).values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
