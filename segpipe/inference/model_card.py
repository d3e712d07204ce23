"""The ``README.md`` model card of a model folder: what it segments, its members and how each was
trained, the warnings to read before use, and the files it holds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def _int8_lines(members: list[Mapping[str, Any]], int8: Mapping[str, Any]) -> list[str]:
    """The int8 networks' check: validation Dice of each network in fp32 and in int8."""
    lines = [
        "Each network is also stored quantised to int8 (`segpipe infer -m THIS_FOLDER precision=int8`), "
        "calibrated on its fold's training patches and checked on its fold's validation cases "
        "(sliding window, no flips):",
        "",
        "| configuration | fold | validation cases | Dice fp32 | Dice int8 | tolerance |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for m in members:
        q = int8.get(m["file"])
        if q:
            lines.append(
                f"| {m['configuration']} | {m['fold']} | {q['cases']} | {q['dice_fp32']:.4f} | "
                f"{q['dice_int8']:.4f} | {q['tolerance']:g} |"
            )
    return [*lines, ""]


def model_card(info: Mapping[str, Any]) -> str:
    labels = ", ".join(f"{k} {v}" for k, v in info["labels"].items())
    channels = ", ".join(f"{k} {v}" for k, v in info["channel_names"].items())
    lines = [
        f"# segpipe model: {info['dataset']}",
        "",
        f"Segments {labels} from {channels} images.",
        "",
        "Use it with `segpipe infer INPUT -m THIS_FOLDER` or, in Python,",
        "`segpipe.Predictor.from_model('THIS_FOLDER').predict('image.nii.gz')`.",
        "",
        "| configuration | fold | validation Dice (foreground mean) | epochs | training / validation cases "
        "| spacing (mm) | training time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    if info.get("openvino"):
        lines[6:6] = [
            f"The networks are also stored converted for OpenVINO {info['openvino']['version']} (`openvino/`): "
            "on a CPU with that version `segpipe infer` loads them without converting.",
            "",
        ]
    int8 = (info.get("openvino") or {}).get("int8") or {}
    if int8:
        lines[6:6] = _int8_lines(info["members"], int8)
    for m in info["members"]:
        dice = "n/a" if m.get("validation_dice") is None else f"{m['validation_dice']:.4f}"
        t = m.get("training") or {}
        epochs = "n/a"
        if t.get("epochs_done") is not None:
            epochs = f"{t['epochs_done']} of {t.get('epochs_planned', '?')}" + (
                f" × {t['iterations_per_epoch']} iterations" if t.get("iterations_per_epoch") else ""
            )
            if t.get("max_time"):
                epochs += f" (budget {t['max_time']})"
            if not t.get("finished", True):
                epochs += ", unfinished"
        cases = f"{t['training_cases']} / {t['validation_cases']}" if t.get("training_cases") is not None else "n/a"
        spacing = " × ".join(f"{v:g}" for v in t["spacing_mm"]) if t.get("spacing_mm") else "n/a"
        took = _duration(t["training_seconds"]) if t.get("training_seconds") else "n/a"
        lines.append(f"| {m['configuration']} | {m['fold']} | {dice} | {epochs} | {cases} | {spacing} | {took} |")
    warnings = info.get("warnings") or []
    if warnings:
        lines += ["", "**Before use:**", "", *(f"- {w}" for w in warnings)]
    post = info["postprocessing"]["largest_component"]
    lines += [
        "",
        "Post-processing: "
        + (
            "keep the largest connected component of class " + ", ".join(str(c) for c in post)
            if post
            else "none (the argmax of the ensemble)"
        )
        + ".",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + ".",
        "",
    ]
    return "\n".join(lines)
