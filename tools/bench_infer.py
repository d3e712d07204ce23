#!/usr/bin/env python
"""Benchmark prediction speed per case: segpipe's ``infer`` against nnU-Net v2's ``nnUNetPredictor``.

Both predict the same hippocampus test images with **the same network and weights** (segpipe's
``3d_fullres`` network of the plan, random weights — weights do not change speed — handed to
nnU-Net as a TorchScript module through ``nnUNetPredictor.manual_initialization``), one fold,
overlap 0.5, Gaussian weighting, all 8 flips, 2 threads each, on the CPU, in the same run:

1. setup (not timed): ``segpipe plan`` of the dataset; the network built and saved as a model
   folder (``segpipe export``'s format) and as TorchScript; nnU-Net's fingerprint and plan of the
   same data (``nnUNetv2_extract_fingerprint``, ``nnUNetv2_plan_experiment``);
2. segpipe, once per side (``--runtimes openvino,torch``; a side may add a precision and a window
   mode: ``openvino:bf16:fit``): ``Predictor.from_model(..., runtime=...).prepare()`` (OpenVINO's conversion is part of loading, not timed) then
   ``infer_cases`` over the images, in its own process;
3. nnU-Net: ``nnUNetPredictor(...).manual_initialization(...)`` then ``predict_from_files`` over the
   same images (``nnUNet_def_n_proc=2``), in its own process with nnU-Net's Python.

With ``--model DIR`` a trained model folder (one 3d_fullres fold) replaces the random network on
every side: int8 sides (``openvino:int8``) need one exported with ``quantize=int8``.

The sides run interleaved, ``--rounds`` times (A, B, C, A, B, C: the machine's speed drifts between
runs), and each side's median counts. Each reports the seconds of prediction (model loaded,
imports done) per case and its peak RSS (process tree, sampled every 20 ms); the label maps of
every pair of sides are compared voxel by voxel.

With ``--memory`` it measures memory instead: one synthetic CT-like volume of 512×512×600 voxels
(int16, 0.8×0.8×1 mm), a small real network of 10 classes (3 stages of width 8, 16, 32 — segpipe's
U-Net has at least 3 — patch 128³, random weights) as segpipe's plan and, for nnU-Net, the same network as TorchScript with a hand-made plan
of the same patch, spacing and CT normalisation; no TTA, 2 threads each, windows side by side
(``--memory-overlap 0``, nnU-Net's ``tile_step_size=1``) by default: such a thin network runs ~5 s
per 128³ window on 2 CPU cores, so overlap 0.5 (441 windows) would take over half an hour per
side, and neither tool's memory depends on the overlap (nnU-Net sums into whole-volume arrays,
segpipe into one patch depth of rows). Ten float32
class maps of that volume alone are 6.3 GB; each side's peak RSS is its whole process tree's,
sampled every 20 ms.

    python tools/bench_infer.py --nnunet-python ../nnunet-venv/bin/python --json out.json
    python tools/bench_infer.py --cases 5          # segpipe only (nnU-Net skipped without its Python)
    python tools/bench_infer.py --model model_int8/ --runtimes openvino,openvino:int8 --nnunet-python ...
    python tools/bench_infer.py --memory --nnunet-python ../nnunet-venv/bin/python --json mem.json
    python tools/bench_infer.py --soak             # RSS over 200 cases in one run (segpipe only)

With ``--soak`` it checks that a long batch holds its memory flat: one ``infer_cases`` run over
200 hippocampus test images (the 130 of ``imagesTs``, then again under other names), the same
random-weight network, no TTA; the process's RSS is read after every case, and the growth from
case 20 (after warm-up) to the largest later reading must stay under ``SOAK_BOUND_MB``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

SOAK_CASES = 200
SOAK_WARMUP = 20
SOAK_BOUND_MB = 50.0  # RSS growth allowed after warm-up over the whole soak
MEMORY_SHAPE = (600, 512, 512)  # z, y, x
MEMORY_SPACING = (1.0, 0.8, 0.8)  # z, y, x in mm
MEMORY_CLASSES = 10
MEMORY_PATCH = (128, 128, 128)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import nnunet_raw, run_measured  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"
THREADS = 2

SEGPIPE_SNIPPET = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from pathlib import Path
from segpipe.inference import Predictor, discover_inputs, infer_cases
model, images, out = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
side = json.loads(sys.argv[5])
predictor = Predictor.from_model(model, device="cpu", tta=True, overlap=0.5, **side).prepare()
load = time.perf_counter() - t0
cases = discover_inputs(images)
t1 = time.perf_counter()
res = infer_cases(predictor, cases, out, overwrite=True)
wall = time.perf_counter() - t1
assert not res["failed"], res["failed"]
print("RESULT " + json.dumps({"load_s": load, "predict_s": wall, "cases": len(cases), "runtime": predictor.runtime}))
"""

NNUNET_SNIPPET = r"""
import json, os, sys, time
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
ts, plans_path, dataset_json, images, out, threads = sys.argv[1:7]
torch.set_num_threads(int(threads))
t0 = time.perf_counter()
net = torch.jit.load(ts, map_location="cpu").eval()
plans = PlansManager(load_json(plans_path))
conf = plans.get_configuration("3d_fullres")
predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
predictor.manual_initialization(net, plans, conf, [net.state_dict()], load_json(dataset_json), "nnUNetTrainer", (0, 1, 2))
load = time.perf_counter() - t0
files = sorted(str(p) for p in __import__("pathlib").Path(images).glob("*.nii.gz"))
t1 = time.perf_counter()
predictor.predict_from_files([[f] for f in files], out, save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
wall = time.perf_counter() - t1
print("RESULT " + json.dumps({"load_s": load, "predict_s": wall, "cases": len(files),
                              "patch_size": list(conf.patch_size)}))
"""


SEGPIPE_MEMORY_SNIPPET = r"""
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from segpipe.inference import Predictor, discover_inputs, infer_cases
model, images, out = sys.argv[1], sys.argv[2], sys.argv[3]
predictor = Predictor.from_model(model, device="cpu", tta=False, overlap=float(sys.argv[5]))
cases = discover_inputs(images)
t1 = time.perf_counter()
res = infer_cases(predictor, cases, out, overwrite=True)
wall = time.perf_counter() - t1
assert not res["failed"], res["failed"]
print("RESULT " + json.dumps({"load_s": 0.0, "predict_s": wall, "cases": len(cases)}))
"""

SEGPIPE_SOAK_SNIPPET = r"""
import json, sys, time
import psutil, torch
torch.set_num_threads(int(sys.argv[4]))
from segpipe.inference import Predictor, discover_inputs, infer_cases
model, images, out = sys.argv[1], sys.argv[2], sys.argv[3]
predictor = Predictor.from_model(model, device="cpu", tta=False, overlap=0.5)
cases = discover_inputs(images)
me, rss = psutil.Process(), []
t1 = time.perf_counter()
res = infer_cases(predictor, cases, out, overwrite=True, progress=lambda i, n, what: rss.append(me.memory_info().rss >> 20))
wall = time.perf_counter() - t1
assert not res["failed"], res["failed"]
print("RESULT " + json.dumps({"load_s": 0.0, "predict_s": wall, "cases": len(cases), "rss_after_case": rss}))
"""

NNUNET_MEMORY_SNIPPET = r"""
import json, sys, time
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
ts, plans_path, dataset_json, image, out, threads, overlap = sys.argv[1:8]
torch.set_num_threads(int(threads))
net = torch.jit.load(ts, map_location="cpu").eval()
plans = PlansManager(load_json(plans_path))
conf = plans.get_configuration("3d_fullres")
predictor = nnUNetPredictor(tile_step_size=1.0 - float(overlap), use_gaussian=True, use_mirroring=False,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
predictor.manual_initialization(net, plans, conf, [net.state_dict()], load_json(dataset_json), "nnUNetTrainer", None)
t1 = time.perf_counter()
predictor.predict_from_files([[image]], out, save_probabilities=False, overwrite=True,
                             num_processes_preprocessing=1, num_processes_segmentation_export=1)
wall = time.perf_counter() - t1
print("RESULT " + json.dumps({"load_s": 0.0, "predict_s": wall, "cases": 1}))
"""


def _say(text: str) -> None:
    print(text, flush=True)


def _result(measured: dict[str, Any], step: str) -> dict[str, Any]:
    if measured["returncode"] != 0:
        raise RuntimeError(f"{step} failed (exit {measured['returncode']}):\n{measured['output_tail']}")
    line = next(ln for ln in measured["output_tail"].splitlines() if ln.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    out["wall_s"] = measured["wall_s"]
    out["peak_rss_mb"] = measured["peak_rss_mb"]
    out["seconds_per_case"] = out["predict_s"] / max(1, out["cases"])
    return out


def _segpipe_env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": str(THREADS),
    }


def setup_segpipe(
    data: Path, work: Path, n_cases: int, trained: Path | None = None
) -> tuple[Path, Path, Path, list[int]]:
    """Plan, build the network (random weights), write the model folder and TorchScript; link the images.
    With ``trained`` (a model folder of one 3d_fullres fold) its plan and weights are used instead."""
    sys.path.insert(0, str(REPO))
    import torch

    import segpipe
    from segpipe.checkpoint import load_checkpoint, save_checkpoint
    from segpipe.inference.model import Member, Model, export_model, load_model_folder
    from segpipe.networks import build_network
    from segpipe.planning import load_plan

    if trained is not None:
        folder = load_model_folder(trained)
        plan, member = folder.plan, folder.members[0]
        cfg = plan.config(member.configuration)
        net = build_network(cfg, plan.in_channels, plan.num_classes, deep_supervision=True).eval()
        net.load_state_dict(load_checkpoint(member.path, map_location="cpu")["model"])
        model = trained
    else:
        planned = segpipe.plan(data, work_dir=work / "ws", configurations=["3d_fullres"])
        plan = load_plan(planned["plans_path"])
        cfg = plan.config("3d_fullres")
        torch.manual_seed(0)
        net = build_network(cfg, plan.in_channels, plan.num_classes, deep_supervision=True).eval()
        weights = work / "fold_0.pt"
        save_checkpoint(weights, {"model": net.state_dict()})
        model = export_model(Model(plan, [Member("3d_fullres", "0", weights)]), work / "model", overwrite=True)
    example = torch.zeros((1, plan.in_channels, *cfg.patch_size))
    with torch.no_grad():
        scripted = torch.jit.trace(net, example, check_trace=False)
    ts = work / "network.ts"
    scripted.save(str(ts))
    images = work / "images"
    images.mkdir(exist_ok=True)
    sources = sorted((data / "imagesTs").glob("*.nii.gz"))[:n_cases]
    if len(sources) < n_cases:
        raise RuntimeError(f"{data / 'imagesTs'} holds {len(sources)} images, {n_cases} asked for")
    for src in sources:  # nnU-Net's channel naming, which both tools read (<case>_0000.nii.gz → <case>)
        link = images / (src.name[: -len(".nii.gz")] + "_0000.nii.gz")
        if not link.exists():
            os.symlink(src.resolve(), link)
    return model, ts, images, [int(p) for p in cfg.patch_size]


def side_settings(spec: str) -> dict[str, str]:
    """The settings of a segpipe side named ``runtime[:precision][:window]``: ``openvino``,
    ``openvino:bf16``, ``openvino:fit``, ``torch:pad`` (precision fp32 and window pad unless named)."""
    runtime, *rest = [part.strip().lower() for part in spec.split(":")]
    settings = {"runtime": runtime, "precision": "fp32", "window": "pad"}
    for part in rest:
        if part in ("fp32", "bf16", "int8"):
            settings["precision"] = part
        elif part in ("fit", "pad"):
            settings["window"] = part
        else:
            raise SystemExit(f"{spec}: {part} is neither a precision (fp32, bf16, int8) nor a window (fit, pad)")
    return settings


def bench_segpipe(model: Path, images: Path, out: Path, runtime: str = "torch") -> dict[str, Any]:
    side = json.dumps(side_settings(runtime))
    cmd = [sys.executable, "-c", SEGPIPE_SNIPPET, str(model), str(images), str(out), str(THREADS), side]
    return _result(run_measured(cmd, env=_segpipe_env(), cwd=REPO), "segpipe")


def bench_nnunet(python: Path, data: Path, work: Path, ts: Path, images: Path, out: Path) -> dict[str, Any]:
    bindir = python.parent
    raw, pre = work / "nnUNet_raw", work / "nnUNet_preprocessed"
    raw.mkdir(parents=True, exist_ok=True)
    pre.mkdir(parents=True, exist_ok=True)
    name, _ = nnunet_raw(data, raw) if not any(raw.iterdir()) else (next(raw.iterdir()).name, 0)
    env = {
        **os.environ,
        "nnUNet_raw": str(raw),
        "nnUNet_preprocessed": str(pre),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_compile": "False",
        "nnUNet_def_n_proc": str(THREADS),
        "OMP_NUM_THREADS": str(THREADS),
    }
    plans = pre / name / "nnUNetPlans.json"
    if not plans.is_file():
        for exe, args in (
            ("nnUNetv2_extract_fingerprint", ["-d", "999", "-np", "2"]),
            ("nnUNetv2_plan_experiment", ["-d", "999"]),
        ):
            r = run_measured([str(bindir / exe), *args], env=env)
            if r["returncode"] != 0:
                raise RuntimeError(f"{exe} failed:\n{r['output_tail']}")
    cmd = [
        str(python),
        "-c",
        NNUNET_SNIPPET,
        str(ts),
        str(plans),
        str(raw / name / "dataset.json"),
        str(images),
        str(out),
        str(THREADS),
    ]
    return _result(run_measured(cmd, env=env), "nnU-Net")


def nnunet_ct_plans(
    dataset: str,
    *,
    spacing: list[float],
    shape: list[int],
    patch: list[int],
    intensity: dict[str, float],
    original: tuple[list[float], list[int]] | None = None,
) -> dict[str, Any]:
    """A hand-made nnU-Net plan of one 3d_fullres configuration: ``spacing`` (the images' median
    ``shape`` there), ``patch`` and CT normalisation clipped to ``intensity``'s min and max (its 0.5
    and 99.5 percentiles), z-scored by its mean and std; nnU-Net's default resampling; batch 2.
    ``original``: the images' own (spacing, shape), when they are not already at ``spacing``."""
    original_spacing, original_shape = original if original is not None else (spacing, shape)
    return {
        "dataset_name": dataset,
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": original_spacing,
        "original_median_shape_after_transp": original_shape,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": list(patch),
                "median_image_size_in_voxels": shape,
                "spacing": spacing,
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {
                    "is_seg": False,
                    "order": 1,
                    "order_z": 0,
                    "force_separate_z": None,
                },
                "architecture": {
                    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                    "arch_kwargs": {},
                    "_kw_requires_import": [],
                },
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": intensity["max"],
                "mean": intensity["mean"],
                "median": intensity["median"],
                "min": intensity["min"],
                "percentile_00_5": intensity["min"],
                "percentile_99_5": intensity["max"],
                "std": intensity["std"],
            }
        },
    }


def setup_memory(work: Path) -> dict[str, Path]:
    """The CT-like volume, segpipe's 10-class plan and model folder, the TorchScript network, and
    nnU-Net's plan and dataset.json for it (not timed)."""
    sys.path.insert(0, str(REPO))
    import numpy as np
    import torch

    from segpipe.checkpoint import save_checkpoint
    from segpipe.geometry import Geometry
    from segpipe.inference.model import Member, Model, export_model
    from segpipe.io.image import write_image
    from segpipe.networks import build_network
    from segpipe.planning import Plan

    work.mkdir(parents=True, exist_ok=True)
    images = work / "memory_images"
    images.mkdir(exist_ok=True)
    image = images / "ct_0000.nii.gz"
    if not image.is_file():
        rng = np.random.default_rng(0)
        z, y, x = MEMORY_SHAPE
        yy, xx = np.ogrid[:y, :x]
        body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.47 * x)) ** 2 <= 1.0
        vol = np.full(MEMORY_SHAPE, -1000, dtype=np.int16)
        for k in range(z):  # soft tissue inside the body, a brighter "organ" that drifts with z, noise
            sl = np.where(body, 40, -1000).astype(np.int16)
            cy, cx = int(y * (0.4 + 0.2 * k / z)), int(x * 0.55)
            sl[cy - 40 : cy + 40, cx - 50 : cx + 50] = 180
            sl += rng.normal(0, 20, size=(y, x)).astype(np.int16)
            vol[k] = sl
        write_image(image, vol, Geometry(shape=MEMORY_SHAPE, spacing=MEMORY_SPACING))
        del vol
    labels = {str(i): ("background" if i == 0 else f"structure_{i}") for i in range(MEMORY_CLASSES)}
    spacing = list(MEMORY_SPACING)
    plan_dict: dict[str, Any] = {
        "schema_version": 1,
        "dataset": "ctmemory",
        "fingerprint_sha256": "0" * 64,
        "anisotropic": False,
        "anisotropic_axis": None,
        "channel_names": {"0": "CT"},
        "in_channels": 1,
        "labels": labels,
        "num_classes": MEMORY_CLASSES,
        "median_shape": list(MEMORY_SHAPE),
        "median_spacing": spacing,
        "target_spacing": spacing,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "normalization": [
            {"channel": 0, "name": "CT", "scheme": "ct", "mean": 60.0, "std": 80.0, "clip": [-200.0, 400.0]}
        ],
        "configurations": {
            "3d_fullres": {
                "name": "3d_fullres",
                "architecture": "unet",
                "attention": False,
                "batch_dice": False,
                "batch_size": 2,
                "context_slices": 0,
                "data_identifier": "3d_memory",
                "deep_supervision_outputs": 1,
                "dims": 3,
                "features": [8, 16, 32],
                "kernel_sizes": [[3, 3, 3], [3, 3, 3], [3, 3, 3]],
                "median_shape": list(MEMORY_SHAPE),
                "n_conv_decoder": [2, 2],
                "n_conv_encoder": [2, 2, 2],
                "num_stages": 3,
                "patch_size": list(MEMORY_PATCH),
                "resample_slices": True,
                "spacing": spacing,
                "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
            }
        },
    }
    plan = Plan.from_dict(plan_dict)
    cfg = plan.config("3d_fullres")
    torch.manual_seed(0)
    net = build_network(cfg, 1, MEMORY_CLASSES, deep_supervision=True).eval()
    weights = work / "memory_fold_0.pt"
    save_checkpoint(weights, {"model": net.state_dict()})
    model = export_model(Model(plan, [Member("3d_fullres", "0", weights)]), work / "memory_model", overwrite=True)
    with torch.no_grad():
        scripted = torch.jit.trace(net, torch.zeros((1, 1, *MEMORY_PATCH)), check_trace=False)
    ts = work / "memory_network.ts"
    scripted.save(str(ts))
    # nnU-Net's plan: the same patch, spacing and CT normalisation (its own clip and statistics)
    nn_plans = nnunet_ct_plans(
        "Dataset998_ctmemory",
        spacing=spacing,
        shape=list(MEMORY_SHAPE),
        patch=list(MEMORY_PATCH),
        intensity={"min": -200.0, "max": 400.0, "mean": 60.0, "median": 40.0, "std": 80.0},
    )
    nn_plans_path = work / "memory_nnUNetPlans.json"
    nn_plans_path.write_text(json.dumps(nn_plans, indent=1))
    dataset_json = work / "memory_dataset.json"
    dataset_json.write_text(
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
    return {
        "model": model,
        "images": images,
        "image": image,
        "ts": ts,
        "nn_plans": nn_plans_path,
        "dataset_json": dataset_json,
    }


def bench_memory(a: argparse.Namespace, work: Path, result: dict[str, Any]) -> None:
    _say(
        f"setup (not timed): a CT-like volume of {MEMORY_SHAPE[2]}x{MEMORY_SHAPE[1]}x{MEMORY_SHAPE[0]} voxels, "
        f"a {MEMORY_CLASSES}-class network (3 stages, width 8, patch {MEMORY_PATCH})"
    )
    setup = setup_memory(work)
    result.update(
        {
            "memory_shape_zyx": list(MEMORY_SHAPE),
            "classes": MEMORY_CLASSES,
            "patch_size": list(MEMORY_PATCH),
            "overlap": a.memory_overlap,
        }
    )
    _say(f"segpipe: Predictor.from_model + infer_cases, no TTA, overlap {a.memory_overlap} ...")
    cmd = [sys.executable, "-c", SEGPIPE_MEMORY_SNIPPET, str(setup["model"]), str(setup["images"])]
    cmd += [str(work / "memory_out_segpipe"), str(THREADS), str(a.memory_overlap)]
    seg = _result(run_measured(cmd, env=_segpipe_env(), cwd=REPO), "segpipe")
    result["segpipe"] = seg
    _say(f"segpipe: peak RSS {seg['peak_rss_mb']:.0f} MB, {seg['predict_s']:.0f} s")
    if a.nnunet_python is None:
        _say("nnU-Net: skipped (no --nnunet-python)")
        return
    _say(f"nnU-Net: nnUNetPredictor.predict_from_files with the same network, no TTA, overlap {a.memory_overlap} ...")
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_compile": "False",
        "nnUNet_def_n_proc": str(THREADS),
        "OMP_NUM_THREADS": str(THREADS),
    }
    cmd = [str(a.nnunet_python), "-c", NNUNET_MEMORY_SNIPPET, str(setup["ts"]), str(setup["nn_plans"])]
    cmd += [str(setup["dataset_json"]), str(setup["image"]), str(work / "memory_out_nnunet"), str(THREADS)]
    cmd += [str(a.memory_overlap)]
    nn = _result(run_measured(cmd, env=env), "nnU-Net")
    result["nnunet"] = nn
    _say(f"nnU-Net: peak RSS {nn['peak_rss_mb']:.0f} MB, {nn['predict_s']:.0f} s")
    result["rss_ratio"] = seg["peak_rss_mb"] / nn["peak_rss_mb"]
    result["label_agreement"] = agreement(work / "memory_out_segpipe", work / "memory_out_nnunet")
    _say(
        f"segpipe's peak is {100 * result['rss_ratio']:.0f} % of nnU-Net's (target ≤ 50 %, and ≤ 4096 MB); "
        f"label maps agree on {100 * result['label_agreement']:.3f} % of voxels"
    )


def bench_soak(a: argparse.Namespace, work: Path, result: dict[str, Any]) -> None:
    _say(f"setup (not timed): plan, network, model folder; {SOAK_CASES} inputs from {a.data / 'imagesTs'}")
    model, _ts, _images, _patch = setup_segpipe(a.data, work, 1)
    soak = work / "soak_images"
    soak.mkdir(exist_ok=True)
    sources = sorted((a.data / "imagesTs").glob("*.nii.gz"))
    if not sources:
        raise RuntimeError(f"no images in {a.data / 'imagesTs'}")
    for i in range(SOAK_CASES):
        src = sources[i % len(sources)]
        link = soak / f"soak{i:03d}_{src.name[: -len('.nii.gz')]}_0000.nii.gz"
        if not link.exists():
            os.symlink(src.resolve(), link)
    _say(f"segpipe: one infer_cases run over {SOAK_CASES} cases, no TTA, RSS after every case ...")
    cmd = [sys.executable, "-c", SEGPIPE_SOAK_SNIPPET, str(model), str(soak), str(work / "soak_out"), str(THREADS)]
    seg = _result(run_measured(cmd, env=_segpipe_env(), cwd=REPO), "segpipe")
    rss = [float(r) for r in seg.pop("rss_after_case")]  # MB
    base = rss[SOAK_WARMUP - 1]
    growth = max(rss[SOAK_WARMUP - 1 :]) - base
    result["segpipe"] = seg
    result["soak"] = {
        "cases": len(rss),
        "rss_mb_first_case": round(rss[0], 1),
        "rss_mb_after_warmup": round(base, 1),
        "rss_mb_last_case": round(rss[-1], 1),
        "growth_after_warmup_mb": round(growth, 1),
        "bound_mb": SOAK_BOUND_MB,
        "held": growth <= SOAK_BOUND_MB,
    }
    _say(
        f"segpipe: RSS {rss[0]:.0f} MB after case 1, {base:.0f} MB after case {SOAK_WARMUP}, {rss[-1]:.0f} MB after "
        f"case {len(rss)}; growth after warm-up {growth:.1f} MB (bound {SOAK_BOUND_MB:.0f} MB): "
        f"{'held' if growth <= SOAK_BOUND_MB else 'EXCEEDED'}; {seg['seconds_per_case']:.2f} s per case"
    )


def agreement(a_dir: Path, b_dir: Path) -> float:
    """Share of voxels where the two tools' label maps agree, over every case both wrote."""
    sys.path.insert(0, str(REPO))
    import numpy as np

    from segpipe.io.image import read_image

    same = total = 0
    for a in sorted(a_dir.glob("*.nii.gz")):
        b = b_dir / a.name
        if not b.is_file():
            continue
        la, _ = read_image(a)
        lb, _ = read_image(b)
        same += int(np.count_nonzero(la == lb))
        total += la.size
    return same / total if total else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="dataset with imagesTs (default: shared hippocampus)"
    )
    ap.add_argument("--nnunet-python", type=Path, default=None, help="a Python with nnunetv2 installed")
    ap.add_argument("--cases", type=int, default=20, help="test images to predict (default 20)")
    ap.add_argument(
        "--model",
        type=Path,
        default=None,
        help="a trained model folder (segpipe export; with quantize=int8 for int8 sides) instead of random weights",
    )
    ap.add_argument("--work", type=Path, default=None, help="keep the work folder here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument(
        "--memory", action="store_true", help="measure peak memory on one 512x512x600 CT-like volume instead"
    )
    ap.add_argument(
        "--memory-overlap", type=float, default=0.0, help="window overlap of --memory (default 0: windows side by side)"
    )
    ap.add_argument("--soak", action="store_true", help=f"RSS over {SOAK_CASES} cases in one run (segpipe only)")
    ap.add_argument(
        "--runtimes",
        type=lambda text: [t.strip() for t in text.split(",") if t.strip()],
        default=["openvino", "torch"],
        help="segpipe sides to time, comma-separated, each a runtime with an optional :precision and :window "
        "(default: openvino,torch; e.g. openvino:fit,openvino:pad,openvino:bf16:fit,torch)",
    )
    ap.add_argument(
        "--rounds", type=int, default=2, help="interleaved rounds of every side (default 2; the median counts)"
    )
    a = ap.parse_args()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="segpipe-bench-infer-") if a.work is None else None
    work = Path(tmp_ctx.name) if tmp_ctx is not None else a.work
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"data": str(a.data), "cases": a.cases, "threads": THREADS}
    try:
        if a.memory:
            result = {"threads": THREADS}
            bench_memory(a, work, result)
            return 0
        if a.soak:
            result = {"threads": THREADS}
            bench_soak(a, work, result)
            return 0 if result["soak"]["held"] else 1
        _say(f"setup (not timed): plan, network, model folder, TorchScript; {a.cases} images of {a.data / 'imagesTs'}")
        model, ts, images, patch = setup_segpipe(a.data, work, a.cases, a.model)
        result["patch_size"] = patch
        sides = [f"segpipe-{rt}" for rt in a.runtimes] + (["nnunet"] if a.nnunet_python is not None else [])
        if a.nnunet_python is None:
            _say("nnU-Net: skipped (no --nnunet-python)")
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for round_ in range(1, a.rounds + 1):  # interleaved: the machine's speed drifts between runs
            for side in sides:
                out = work / f"out_{side.replace(':', '-')}"
                if side == "nnunet":
                    _say(
                        f"round {round_}: nnU-Net nnUNetPredictor.predict_from_files, same network, TTA 8 flips (timed) ..."
                    )
                    run = bench_nnunet(a.nnunet_python, a.data, work, ts, images, out)
                    if run["patch_size"] != patch:
                        _say(f"warning: nnU-Net's plan has patch {run['patch_size']}, segpipe's {patch}")
                else:
                    runtime = side.split("-", 1)[1]  # openvino, torch, openvino:bf16:fit, ...
                    _say(
                        f"round {round_}: segpipe runtime={runtime}, Predictor.from_model + infer_cases, TTA 8 flips (timed) ..."
                    )
                    run = bench_segpipe(model, images, out, runtime)
                runs[side].append(run)
                _say(
                    f"  {side}: {run['seconds_per_case']:.2f} s per case ({run['predict_s']:.1f} s for {run['cases']}), "
                    f"peak RSS {run['peak_rss_mb']:.0f} MB"
                )
        for side, side_runs in runs.items():
            per_case = sorted(r["seconds_per_case"] for r in side_runs)
            result[side] = {**side_runs[-1], "seconds_per_case": per_case[len(per_case) // 2], "rounds": side_runs}
        result["label_agreement"] = {}
        for i, x in enumerate(sides):
            for y in sides[i + 1 :]:
                result["label_agreement"][f"{x} vs {y}"] = agreement(
                    work / f"out_{x.replace(':', '-')}", work / f"out_{y.replace(':', '-')}"
                )
        _say("median seconds per case: " + ", ".join(f"{s} {result[s]['seconds_per_case']:.2f}" for s in sides))
        if "nnunet" in result:
            for side in sides[:-1]:
                result[f"speedup {side}"] = result["nnunet"]["seconds_per_case"] / result[side]["seconds_per_case"]
                _say(f"{side} is {result[f'speedup {side}']:.2f}x nnU-Net's speed per case")
        for pair, value in result["label_agreement"].items():
            _say(f"label maps {pair}: {100 * value:.3f} % of voxels agree")
    finally:
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
