#!/usr/bin/env python
"""Benchmark prediction speed per case: segpipe's ``infer`` against nnU-Net v2's ``nnUNetPredictor``.

Both predict the same hippocampus test images with **the same network and weights** (segpipe's
``3d_fullres`` network of the plan, random weights — weights do not change speed — handed to
nnU-Net as a TorchScript module through ``nnUNetPredictor.manual_initialization``), one fold,
overlap 0.5, Gaussian weighting, all 8 flips, 2 threads each, on the CPU, in the same run:

1. setup (not timed): ``segpipe plan`` of the dataset; the network built and saved as a model
   folder (``segpipe export``'s format) and as TorchScript; nnU-Net's fingerprint and plan of the
   same data (``nnUNetv2_extract_fingerprint``, ``nnUNetv2_plan_experiment``);
2. segpipe: ``Predictor.from_model`` then ``infer_cases`` over the images, in its own process;
3. nnU-Net: ``nnUNetPredictor(...).manual_initialization(...)`` then ``predict_from_files`` over the
   same images (``nnUNet_def_n_proc=2``), in its own process with nnU-Net's Python.

Each side reports the seconds of prediction (model loaded, imports done) per case and its peak
RSS (process tree, sampled every 20 ms); the label maps of both are compared voxel by voxel.

    python tools/bench_infer.py --nnunet-python ../nnunet-venv/bin/python --json out.json
    python tools/bench_infer.py --cases 5          # segpipe only (nnU-Net skipped without its Python)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plan import _nnunet_raw, run_measured  # noqa: E402

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
predictor = Predictor.from_model(model, device="cpu", tta=True, overlap=0.5)
load = time.perf_counter() - t0
cases = discover_inputs(images)
t1 = time.perf_counter()
res = infer_cases(predictor, cases, out, overwrite=True)
wall = time.perf_counter() - t1
assert not res["failed"], res["failed"]
print("RESULT " + json.dumps({"load_s": load, "predict_s": wall, "cases": len(cases)}))
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


def setup_segpipe(data: Path, work: Path, n_cases: int) -> tuple[Path, Path, Path, list[int]]:
    """Plan, build the network (random weights), write the model folder and TorchScript; link the images."""
    sys.path.insert(0, str(REPO))
    import torch

    import segpipe
    from segpipe.inference.model import Member, Model, export_model
    from segpipe.networks import build_network
    from segpipe.planning import load_plan
    from segpipe.training.checkpoint import save_checkpoint

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


def bench_segpipe(model: Path, images: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-c", SEGPIPE_SNIPPET, str(model), str(images), str(out), str(THREADS)]
    return _result(run_measured(cmd, env=_segpipe_env(), cwd=REPO), "segpipe")


def bench_nnunet(python: Path, data: Path, work: Path, ts: Path, images: Path, out: Path) -> dict[str, Any]:
    bindir = python.parent
    raw, pre = work / "nnUNet_raw", work / "nnUNet_preprocessed"
    raw.mkdir(parents=True, exist_ok=True)
    pre.mkdir(parents=True, exist_ok=True)
    name, _ = _nnunet_raw(data, raw) if not any(raw.iterdir()) else (next(raw.iterdir()).name, 0)
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
    ap.add_argument("--work", type=Path, default=None, help="keep the work folder here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    tmp_ctx = tempfile.TemporaryDirectory(prefix="segpipe-bench-infer-") if a.work is None else None
    work = Path(tmp_ctx.name) if tmp_ctx is not None else a.work
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"data": str(a.data), "cases": a.cases, "threads": THREADS}
    try:
        _say(f"setup (not timed): plan, network, model folder, TorchScript; {a.cases} images of {a.data / 'imagesTs'}")
        model, ts, images, patch = setup_segpipe(a.data, work, a.cases)
        result["patch_size"] = patch
        _say("segpipe: Predictor.from_model + infer_cases, TTA 8 flips, overlap 0.5 (timed) ...")
        seg = bench_segpipe(model, images, work / "out_segpipe")
        result["segpipe"] = seg
        _say(
            f"segpipe: {seg['seconds_per_case']:.2f} s per case ({seg['predict_s']:.1f} s for {seg['cases']}), "
            f"peak RSS {seg['peak_rss_mb']:.0f} MB"
        )
        if a.nnunet_python is None:
            _say("nnU-Net: skipped (no --nnunet-python)")
        else:
            _say(
                "nnU-Net: nnUNetPredictor.predict_from_files with the same network, TTA 8 flips, overlap 0.5 (timed) ..."
            )
            nn = bench_nnunet(a.nnunet_python, a.data, work, ts, images, work / "out_nnunet")
            result["nnunet"] = nn
            if nn["patch_size"] != patch:
                _say(f"warning: nnU-Net's plan has patch {nn['patch_size']}, segpipe's {patch}")
            _say(
                f"nnU-Net: {nn['seconds_per_case']:.2f} s per case ({nn['predict_s']:.1f} s for {nn['cases']}), "
                f"peak RSS {nn['peak_rss_mb']:.0f} MB"
            )
            result["speedup"] = nn["seconds_per_case"] / seg["seconds_per_case"]
            result["label_agreement"] = agreement(work / "out_segpipe", work / "out_nnunet")
            _say(
                f"segpipe is {result['speedup']:.2f}x nnU-Net's speed per case (target ≥ 1.5x); "
                f"label maps agree on {100 * result['label_agreement']:.3f} % of voxels"
            )
    finally:
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
