"""Pixel data: decoding (quietly, with advice on the decoder to install), rescaling, resampling."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import DicomError
from .headers import Frame, dcmread, quiet_pydicom, short_error
from .validation import ReadPlan

# Decoding plugins of pydicom (its names) that handle a transfer syntax, and what to install.
_JPEG_LIBJPEG = (("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)")
_DECODER_ADVICE: dict[str, tuple[tuple[str, ...], str]] = {
    "1.2.840.10008.1.2.4.50": _JPEG_LIBJPEG,  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": (("pylibjpeg",), "pylibjpeg pylibjpeg-libjpeg (GDCM and Pillow decode 8-bit JPEG only)"),
    "1.2.840.10008.1.2.4.57": (("pylibjpeg", "gdcm"), "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.4.70": (("pylibjpeg", "gdcm"), "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.4.80": (("pyjpegls", "pylibjpeg", "gdcm"), "pyjpegls (or python-gdcm)"),
    "1.2.840.10008.1.2.4.81": (("pyjpegls", "pylibjpeg", "gdcm"), "pyjpegls (or python-gdcm)"),
    "1.2.840.10008.1.2.4.90": (("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.4.91": (("pylibjpeg", "gdcm", "pillow"), "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"),
    "1.2.840.10008.1.2.5": (("pydicom", "pylibjpeg", "gdcm"), "pylibjpeg pylibjpeg-rle"),
}


#: roots of the vendors' own UIDs, to say whose private transfer syntax a file uses
_VENDOR_UID_ROOTS = {"1.3.46.670589.": "Philips", "1.2.840.113619.": "GE", "1.3.12.2.1107.5.": "Siemens"}


def _is_transfer_syntax(ts: Any) -> bool:
    """Whether ``ts`` is a transfer syntax of the DICOM standard (pydicom's UID dictionary)."""
    from pydicom.uid import UID

    try:
        return bool(UID(str(ts)).is_transfer_syntax)
    except Exception:  # noqa: BLE001 - a malformed UID is no transfer syntax either
        return False


def _private_syntax_failure(path: Path, ts: Any) -> DicomError:
    """One-line error for pixel data in a transfer syntax outside the DICOM standard (a vendor's own)."""
    uid = str(ts)
    vendor = next((name for root, name in _VENDOR_UID_ROOTS.items() if uid.startswith(root)), None)
    what = f"a private {vendor} syntax" if vendor else "not a transfer syntax of the DICOM standard"
    return DicomError(
        f"{path}: cannot decode pixel data stored in transfer syntax {uid} ({what})",
        hint="convert the series to a standard transfer syntax with the vendor's DICOM tools, or export it "
        "uncompressed (explicit VR little endian) from the scanner or PACS",
    )


def decode_failure(path: Path, ds: Any, exc: BaseException) -> DicomError:
    """One-line error for pixel data that cannot be decoded: the file, the syntax, why, and what to do."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and not _is_transfer_syntax(ts):
        return _private_syntax_failure(path, ts)
    bits = ds.get("BitsStored") if ds is not None else None
    plugins, packages = _DECODER_ADVICE.get(str(ts), ((), "")) if ts is not None else ((), "")
    text = str(exc)
    if "exceptions were raised by all available plugins" in text:  # pydicom: one line per plugin
        # the decoder that should handle this syntax first: its reason is the informative one
        lines = [ln.strip() for ln in text.splitlines()[1:] if ln.strip()]
        rank = {name: i for i, name in enumerate(plugins)}
        lines.sort(key=lambda ln: rank.get(ln.split(":", 1)[0], len(rank)))
        why = "every installed decoder failed (" + "; ".join(lines)[:300] + ")"
    else:
        why = short_error(exc)
    syntax = f" ({ts.name}{f', {bits}-bit' if bits else ''})" if ts is not None else ""
    message = f"{path}: cannot decode pixel data{syntax}: {why}"
    if ts is None or not getattr(ts, "is_compressed", False):
        return DicomError(message, hint="the file is truncated or damaged; re-export or replace it")
    try:
        from pydicom.pixels import get_decoder

        available = set(get_decoder(ts).available_plugins)
    except Exception:  # no decoder exists for this syntax at all (video, ...)
        available = set()
    if packages and not available.intersection(plugins):
        hint = f"install a decoder for {ts.name}: pip install {packages}"
    elif packages:
        hint = (
            f"the installed decoders ({', '.join(sorted(available))}) cannot decode it: the data may be damaged or "
            "non-conformant; decompress it with another tool (gdcmconv --raw, dcmdjpeg) or re-export it uncompressed"
        )
    else:
        hint = "segpipe cannot decode this transfer syntax; convert the series to an uncompressed one (gdcmconv --raw)"
    return DicomError(message, hint=hint)


def decode_frames(plan: ReadPlan, where: Path) -> np.ndarray:
    """Stored values of every frame in plan order: (Z, Y, X) or (Z, Y, X, samples)."""
    f0 = plan.frames[0]
    by_file: dict[Path, list[tuple[int, Frame]]] = defaultdict(list)
    for k, fr in enumerate(plan.frames):
        by_file[fr.path].append((k, fr))
    out: np.ndarray | None = None
    for path, items in by_file.items():
        ds = None
        try:
            ds = dcmread(path)
            with quiet_pydicom():
                pixels = ds.pixel_array
        except Exception as exc:  # decoder errors come from many libraries
            raise decode_failure(path, ds, exc) from None
        single = f0.samples == 1
        nframes = int(ds.get("NumberOfFrames", 1) or 1)
        if nframes > 1 and pixels.ndim == (3 if single else 4):
            stack = pixels
        else:
            stack = pixels[None]
        if stack.shape[1:3] != (f0.rows, f0.cols) or stack.shape[3:] != (() if single else (f0.samples,)):
            raise DicomError(
                f"{path}: pixel data shape {stack.shape[1:]} does not match Rows/Columns/SamplesPerPixel "
                f"({f0.rows}, {f0.cols}, {f0.samples})",
                hint="the file is damaged; re-export it",
            )
        if out is None:
            out = np.empty((len(plan.frames),) + stack.shape[1:], dtype=stack.dtype)
        for k, fr in items:
            index = fr.index or 0
            if index >= len(stack):
                raise DicomError(
                    f"{path}: frame {index + 1} is described in the header but the pixel data hold "
                    f"{len(stack)} frame(s)",
                    hint="the file is truncated or damaged; re-export it",
                )
            out[k] = stack[index]
    assert out is not None
    return out


def apply_rescale(stored: np.ndarray, frames: list[Frame]) -> np.ndarray:
    slopes = np.array([f.slope for f in frames], dtype=float)
    inters = np.array([f.intercept for f in frames], dtype=float)
    shape = (-1,) + (1,) * (stored.ndim - 1)
    if np.all(slopes == 1) and np.all(inters == 0):
        return stored
    if np.all(slopes == np.round(slopes)) and np.all(inters == np.round(inters)) and stored.dtype.kind in "iu":
        vals = stored.astype(np.int64) * slopes.astype(np.int64).reshape(shape) + inters.astype(np.int64).reshape(shape)
        lo, hi = int(vals.min()), int(vals.max())
        for dt in (stored.dtype, np.int16, np.int32, np.int64):
            info = np.iinfo(dt)
            if info.min <= lo and hi <= info.max:
                return vals.astype(dt)
    return stored.astype(np.float32) * slopes.astype(np.float32).reshape(shape) + inters.astype(np.float32).reshape(
        shape
    )


def resample_to_plan(data: np.ndarray, plan: ReadPlan) -> np.ndarray:
    """Resample (C, Z, Y, X) slices at positions ``plan.t`` with in-plane offsets onto ``plan.geometry``."""
    from scipy import ndimage

    g = plan.geometry
    fill = float(data.min())
    t = plan.t - plan.t[0]
    tz = np.arange(g.shape[0]) * g.spacing[0]
    out = np.empty((data.shape[0],) + g.shape, dtype=np.float32)
    cache: dict[int, np.ndarray] = {}

    def slab(k: int) -> np.ndarray:
        if k not in cache:
            off_u, off_v = plan.uv[k]
            cache[k] = np.stack(
                [
                    ndimage.affine_transform(
                        data[ch, k].astype(np.float32),
                        np.eye(2),
                        offset=(-off_v, -off_u),
                        output_shape=g.shape[1:],
                        order=1,
                        cval=fill,
                    )
                    for ch in range(data.shape[0])
                ]
            )
        return cache[k]

    for m, tm in enumerate(tz):
        k = int(np.clip(np.searchsorted(t, tm, side="right") - 1, 0, len(t) - 2))
        w = float(np.clip((tm - t[k]) / (t[k + 1] - t[k]), 0.0, 1.0))
        out[:, m] = slab(k) if w < 1e-6 else slab(k + 1) if w > 1 - 1e-6 else (1 - w) * slab(k) + w * slab(k + 1)
        for old in [key for key in cache if key < k]:
            del cache[old]
    if data.dtype.kind in "iu":
        info = np.iinfo(data.dtype)
        return np.clip(np.rint(out), info.min, info.max).astype(data.dtype)
    return out.astype(data.dtype, copy=False)
