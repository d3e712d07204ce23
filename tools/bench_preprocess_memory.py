#!/usr/bin/env python
"""Peak RSS of ``segpipe preprocess`` against the number of cases and of workers.

The cache is written case by case with at most ``num_workers`` cases in flight, so the peak RSS of
the process tree should grow with ``num_workers`` and stay flat with the number of cases. This
measures it on synthetic MR-like volumes (the demo generator with a 200×300×300 mm field of view
at ~1 mm in-plane: ~60×300×300 voxels, ~20 MB float32 per case): 10 and 40 cases (the first 10
the same), ``num_workers`` 1 and 2, each a fresh ``plan`` (not measured) then ``preprocess
config=3d_fullres`` (measured: process tree RSS every 20 ms, launch to exit).

    python tools/bench_preprocess_memory.py --json out.json
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
from bench_plan import run_measured  # noqa: E402

CASES = (10, 40)
WORKERS = (1, 2)
FOV_MM = (200.0, 300.0, 300.0)


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }


def _segpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "segpipe", *args]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="keep the work folder here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from segpipe.demo_data import generate_demo_dataset

    tmp = tempfile.TemporaryDirectory(prefix="segpipe-bench-prep-mem-") if a.work is None else None
    work = Path(tmp.name) if tmp is not None else a.work
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    try:
        for n in CASES:
            data = work / f"Big{n}"
            if not (data / "dataset.json").is_file():
                print(f"generating {n} cases of ~60x300x300 voxels (not measured) ...", flush=True)
                generate_demo_dataset(data, num_cases=n, num_test=0, fov_mm=FOV_MM, overwrite=True)
            for workers in WORKERS:
                ws = work / f"ws_{n}_{workers}"
                r = run_measured(
                    _segpipe("plan", str(data), f"work_dir={ws}", "configurations=[3d_fullres]"), env=_env()
                )
                if r["returncode"] != 0:
                    raise RuntimeError(f"plan failed:\n{r['output_tail']}")
                r = run_measured(
                    _segpipe("preprocess", f"work_dir={ws}", f"num_workers={workers}", "force=true"), env=_env()
                )
                if r["returncode"] != 0:
                    raise RuntimeError(f"preprocess failed:\n{r['output_tail']}")
                row = {"cases": n, "num_workers": workers, "peak_rss_mb": r["peak_rss_mb"], "wall_s": r["wall_s"]}
                rows.append(row)
                print(
                    f"{n} cases, num_workers={workers}: peak RSS {r['peak_rss_mb']:.0f} MB, {r['wall_s']:.1f} s",
                    flush=True,
                )
        by = {(r["cases"], r["num_workers"]): r["peak_rss_mb"] for r in rows}
        for w in WORKERS:
            grow = by[(CASES[1], w)] - by[(CASES[0], w)]
            print(f"num_workers={w}: {CASES[0]} → {CASES[1]} cases changes the peak by {grow:+.0f} MB", flush=True)
        for n in CASES:
            print(f"{n} cases: 1 → 2 workers changes the peak by {by[(n, 2)] - by[(n, 1)]:+.0f} MB", flush=True)
    finally:
        if a.json:
            a.json.write_text(json.dumps({"fov_mm": FOV_MM, "rows": rows}, indent=1))
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
