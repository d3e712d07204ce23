#!/usr/bin/env python
"""The batch report at scale, and its flags on real data: a 200-case ``segpipe infer`` batch of a
trained model, with CT-like images mixed in.

1. a workspace with a trained fold 0 of the dataset (``--work``; the shared hippocampus data by
   default); without one, ``segpipe plan`` and ``segpipe train fold=0 max_time=--max-time`` make it;
2. one batch of ``--cases`` cases: every unlabelled test case (``imagesTs``) and the fold's
   validation cases (both never seen in training: the held-out cases), then training cases to fill
   up, plus ``--ct`` synthetic CT-like volumes (Hounsfield units: air, soft tissue, bone; 3 mm
   slices), segmented by ``segpipe infer … folds=0`` with its report;
3. figures: how many held-out cases were flagged and for what (a false alarm, unless the model
   really got them wrong), whether every CT-like case was flagged, the batch's time and the
   report's share of it (its overlays and its page rewrites, timed inside the same batch), the
   report's images (count, largest), and the time Chromium takes to open it offline (load event;
   ``tests/browser.py``'s harness), with ``--screenshot`` a picture of the page.

    python tools/bench_report.py --work /tmp/hipws/work --json /tmp/bench_report.json
    python tools/bench_report.py --max-time 15m --screenshot docs/batch_report.png
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hippocampus"


def say(msg: str) -> None:
    print(msg, flush=True)


def segpipe(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "segpipe", *args]
    say("$ segpipe " + " ".join(args))
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def ensure_model(data: Path, work: Path, max_time: str) -> str:
    """The dataset's name in ``work``, planned (fingerprint with the training profile) and trained."""
    import segpipe

    planned = segpipe.plan(data, work_dir=work, configurations=["3d_fullres"])
    name = Path(planned["plans_path"]).parent.name
    if not (Path(planned["plans_path"]).parent / "runs" / "3d_fullres" / "fold_0" / "final.pt").is_file():
        r = segpipe_cmd_train(work, name, max_time)
        if r.returncode != 0:
            raise SystemExit(f"training failed:\n{r.stderr[-3000:]}")
    return name


def segpipe_cmd_train(work: Path, name: str, max_time: str) -> subprocess.CompletedProcess[str]:
    return segpipe(
        "train", f"work_dir={work}", f"dataset={name}", "fold=0", "config=3d_fullres", f"max_time={max_time}"
    )


def ct_like(seed: int) -> tuple[np.ndarray, Any]:
    """A CT-like volume in Hounsfield units: air around an elliptic body of soft tissue with a bone ring."""
    from segpipe.geometry import Geometry

    rng = np.random.default_rng(seed)
    shape, spacing = (24, 96, 96), (3.0, 0.8, 0.8)
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    r = np.sqrt(((y - 48) / 40) ** 2 + ((x - 48) / 32) ** 2)
    image = np.full(shape, -1000.0, np.float32)
    image[r < 1.0] = 40.0
    image[(r > 0.55) & (r < 0.62)] = 700.0
    image += rng.normal(0, 15, shape).astype(np.float32)
    return image, Geometry(shape=shape, spacing=spacing)


def build_inputs(data: Path, ws: Path, inputs: Path, n_cases: int, n_ct: int) -> dict[str, list[str]]:
    """The batch's input folder (links to the dataset's images, and the CT-like files); the case ids by kind."""
    from segpipe.io.image import write_image

    inputs.mkdir(parents=True, exist_ok=True)
    splits = json.loads((ws / "splits_final.json").read_text())
    fold = splits[0] if isinstance(splits, list) else splits["folds"][0]
    val, train = list(fold["val"]), list(fold["train"])
    test = sorted(p.name[: -len(".nii.gz")] for p in (data / "imagesTs").glob("*.nii.gz"))
    held_out = (test + val)[:n_cases]
    filler = train[: max(0, n_cases - len(held_out))]
    for case in held_out + filler:
        src = data / ("imagesTs" if case in test else "imagesTr") / f"{case}.nii.gz"
        link = inputs / f"{case}.nii.gz"
        if not link.exists():
            link.symlink_to(src.resolve())
    cts = []
    for i in range(n_ct):
        case = f"ctlike_{i:03d}"
        if not (inputs / f"{case}.nii.gz").exists():
            write_image(inputs / f"{case}.nii.gz", *ct_like(i))
        cts.append(case)
    return {"held_out": held_out, "filler": filler, "ct": cts}


def open_in_browser(report: Path, screenshot: Path | None) -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "tests"))
    from browser import Browser, find_chromium  # the test suite's harness

    exe = find_chromium()
    if exe is None:
        return {"skipped": "no chromium (apt-get install chromium)"}
    with Browser(exe, offline=True) as browser:
        load = browser.open(report)
        images = browser.images()
        if screenshot:
            browser.screenshot(screenshot)
    sizes = [(report.parent / img["src"].split(str(report.parent) + "/")[-1]).stat().st_size for img in images]
    return {
        "load_ms": round(load.load_ms, 1),
        "console_errors": load.console_errors,
        "external_requests": load.external_requests,
        "images": len(images),
        "images_loaded": sum(1 for i in images if i["natural_width"] > 0),
        "largest_image_kb": round(max(sizes, default=0) / 1024, 1),
        "html_kb": round(report.stat().st_size / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="labelled dataset (default: shared hippocampus)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_report/work"), help="workspace to use or make")
    ap.add_argument("--max-time", default="15m", help="training budget when the workspace has no trained fold 0")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_report"), help="scratch: inputs and outputs")
    ap.add_argument("--cases", type=int, default=200, help="cases of the dataset in the batch")
    ap.add_argument("--ct", type=int, default=4, help="CT-like cases added to the batch")
    ap.add_argument("--screenshot", type=Path, default=None, help="write a screenshot of the report here")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = ap.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        say(f"skipped: no dataset at {args.data} (see ../shared/data/README.md)")
        return 0
    name = ensure_model(args.data, args.work, args.max_time)
    kinds = build_inputs(args.data, args.work / name, args.out / "in", args.cases, args.ct)
    out = args.out / "out"
    t0 = time.perf_counter()
    r = segpipe(
        "infer",
        str(args.out / "in"),
        "-o",
        str(out),
        f"work_dir={args.work}",
        f"dataset={name}",
        "folds=0",
        "tta=true",
        "--json",
        "-q",
    )
    wall = time.perf_counter() - t0
    if r.returncode not in (0, 3):
        raise SystemExit(f"infer failed ({r.returncode}):\n{r.stderr[-3000:]}")
    res = json.loads(r.stdout)
    flagged = {f["case"]: f["flags"] for f in res.get("flagged", [])}
    held = [c for c in kinds["held_out"] if c in flagged]
    fig: dict[str, Any] = {
        "cases": len(res["cases"]),
        "written": len(res["written"]),
        "skipped": len(res["skipped"]),
        "failed": res["failed"],
        "held_out": len(kinds["held_out"]),
        "held_out_flagged": {c: [f["message"] for f in flagged[c]] for c in held},
        "ct_flagged": {c: [f["message"] for f in flagged.get(c, [])] for c in kinds["ct"]},
        "batch_s": res["seconds"],
        "wall_s": round(wall, 1),
        "report_s": res.get("report_seconds"),
    }
    fig["report_share"] = round(fig["report_s"] / fig["batch_s"], 4) if fig["batch_s"] else None
    fig["browser"] = open_in_browser(out / "report.html", args.screenshot)
    say(json.dumps(fig, indent=1))
    ct_all = all(fig["ct_flagged"][c] for c in kinds["ct"])
    say(
        f"\n| cases | held-out flagged | CT-like flagged | batch s | report s (share) | open ms | images | largest kB |\n"
        f"|---|---|---|---|---|---|---|---|\n"
        f"| {fig['cases']} | {len(held)} of {fig['held_out']} | {sum(1 for c in kinds['ct'] if fig['ct_flagged'][c])}"
        f" of {len(kinds['ct'])} | {fig['batch_s']:.0f} | {fig['report_s']:.1f} ({100 * (fig['report_share'] or 0):.1f} %)"
        f" | {fig['browser'].get('load_ms')} | {fig['browser'].get('images')} | {fig['browser'].get('largest_image_kb')} |"
    )
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1))
    return 0 if ct_all else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
