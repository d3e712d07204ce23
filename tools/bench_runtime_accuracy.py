#!/usr/bin/env python
"""Check that the networks' runtime does not change accuracy: a model trained on real data, its
fold's validation cases segmented with ``runtime=torch`` and with ``runtime=openvino``, each scored.

1. ``segpipe plan``, ``segpipe preprocess`` (outside the budget) and ``segpipe train fold=0
   config=3d_fullres max_time=…`` on the dataset (the
   shared hippocampus data by default; a short budget is enough: the question is whether two
   runtimes give the same answer, not how good the answer is); an existing ``--work`` and its
   trained run are reused (``--retrain`` trains again);
2. the fold's validation cases (``splits_final.json``), never seen in training, segmented by
   ``segpipe infer`` once per side (``--runtimes``: a runtime, optionally with a precision and a
   window mode, e.g. ``openvino:bf16:fit``; flip TTA, overlap 0.5, the model's own settings);
3. ``segpipe evaluate`` of each against the reference labels: mean foreground Dice per side, and
   against the first side the difference and the share of voxels where the label maps agree.

    python tools/bench_runtime_accuracy.py --max-time 10m --json out.json
    python tools/bench_runtime_accuracy.py --max-time 15m --runtimes torch,openvino,openvino:fit,openvino:bf16:fit
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled dataset (default: shared hippocampus)")
    ap.add_argument("--work", type=Path, default=None, help="workspace to use or reuse (default: a temp folder)")
    ap.add_argument("--max-time", default="10m", help="training budget (default 10m)")
    ap.add_argument(
        "--runtimes",
        default="torch,openvino",
        help="sides to compare with the first, each a runtime with an optional :precision and :window "
        "(default torch,openvino; e.g. torch,openvino,openvino:fit,openvino:bf16:fit)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    ap.add_argument("--retrain", action="store_true", help="train again when --work holds a finished run")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tools"))
    from bench_infer import agreement, side_settings

    import segpipe
    from segpipe.workspace import Workspace

    tmp = tempfile.TemporaryDirectory(prefix="segpipe-runtime-accuracy-") if a.work is None else None
    work = Path(tmp.name) if tmp is not None else a.work
    result: dict[str, Any] = {"data": str(a.data), "max_time": a.max_time}
    try:
        planned = segpipe.plan(a.data, work_dir=work, configurations=["3d_fullres"])
        dws = Workspace.at(work).dataset(planned["dataset"])
        segpipe.preprocess(planned["dataset"], work_dir=str(work), config="3d_fullres")  # outside the budget
        t0 = time.perf_counter()
        trained = segpipe.train(
            work_dir=str(work), config="3d_fullres", fold=0, max_time=a.max_time, overwrite=a.retrain
        )
        result["training"] = {"seconds": time.perf_counter() - t0, "epochs": trained["epochs"]}
        print(f"trained fold 0: {trained['epochs']} epochs; {trained.get('validation')}", flush=True)
        val = json.loads(dws.splits_path.read_text(encoding="utf-8"))[0]["val"]
        cases = work / "validation_cases"
        refs = work / "validation_refs"
        cases.mkdir(exist_ok=True)
        refs.mkdir(exist_ok=True)
        for case in val:
            for src, dst in (
                (a.data / "imagesTr" / f"{case}.nii.gz", cases / f"{case}_0000.nii.gz"),
                (a.data / "labelsTr" / f"{case}.nii.gz", refs / f"{case}.nii.gz"),
            ):
                if not dst.exists():
                    os.symlink(src.resolve(), dst)
        runtimes = [r.strip() for r in a.runtimes.split(",") if r.strip()]
        model = None
        if any(side_settings(r)["precision"] == "int8" for r in runtimes):
            model = work / "model_int8"  # int8 networks live in a model folder: exported, calibrated, checked
            t1 = time.perf_counter()
            segpipe.export(output=model, work_dir=str(work), quantize="int8", overwrite=True)
            info = json.loads((model / "model.json").read_text(encoding="utf-8"))
            result["int8_export"] = {
                **next(iter(info["openvino"]["int8"].values())),
                "seconds": time.perf_counter() - t1,
            }
            q = result["int8_export"]
            print(
                f"export quantize=int8 ({q['seconds']:.0f} s): validation Dice fp32 {q['dice_fp32']:.5f}, "
                f"int8 {q['dice_int8']:.5f} over {q['cases']} cases (no flips)",
                flush=True,
            )
        for runtime in runtimes:
            out = work / f"pred_{runtime.replace(':', '-')}"
            t1 = time.perf_counter()
            side = side_settings(runtime)
            where = {"model": model} if side["precision"] == "int8" else {"work_dir": str(work)}
            res = segpipe.infer(cases, output=out, overwrite=True, **where, **side)
            seconds = time.perf_counter() - t1
            assert not res["failed"], res["failed"]
            ev = segpipe.evaluate(out, refs, output=work / f"eval_{runtime.replace(':', '-')}")
            dice = ev["foreground_mean"]["Dice"]
            result[runtime] = {
                "dice": dice,
                "cases": ev["n_cases"],
                "seconds": seconds,
                "runtime": f"{res['model']['runtime']} {res['model']['precision']} window={res['model']['window']}",
            }
            print(
                f"{result[runtime]['runtime']}: mean foreground Dice {dice:.5f} over {ev['n_cases']} validation cases ({seconds:.0f} s)",
                flush=True,
            )
        x = runtimes[0]
        for y in runtimes[1:]:
            pair = f"{y} vs {x}"
            result[pair] = {
                "dice_difference": result[y]["dice"] - result[x]["dice"],
                "label_agreement": agreement(
                    work / f"pred_{x.replace(':', '-')}", work / f"pred_{y.replace(':', '-')}"
                ),
            }
            print(
                f"Dice {y} − {x}: {result[pair]['dice_difference']:+.6f}; label maps agree on "
                f"{100 * result[pair]['label_agreement']:.4f} % of voxels",
                flush=True,
            )
    finally:
        if a.json:
            a.json.write_text(json.dumps(result, indent=1))
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
