"""Three-plane overlays: a label map over its image, as small palette PNGs a report can show by the hundred.

An overlay shows the axial, coronal and sagittal planes through one point (a structure's centre),
side by side, in the radiological convention whatever the file's own axis order: the volume is
first turned to the patient axes its direction matrix is closest to (:func:`canonical`), then

* axial: anterior up, the patient's right on the left;
* coronal: superior up, the patient's right on the left;
* sagittal: superior up, anterior on the left;

each plane scaled to its physical aspect (anisotropic voxels are not squashed), with the letters of
the patient directions drawn at its edges. The image is windowed to ``window`` (grey), each label
filled in its colour (:mod:`segpipe.colors`) at 40 % and outlined at full strength.

The PNG is written by hand with a palette (colour type 3, zlib): a few grey levels times the label
colours fit 256 entries, so a thumbnail is a few tens of kB and needs no imaging library.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..colors import label_color

__all__ = ["PLANES", "canonical", "centre_of", "encode_png", "three_planes"]

#: each plane's name and the patient directions at its top, bottom, left and right edges
PLANES = (("axial", "APRL"), ("coronal", "SIRL"), ("sagittal", "SIAP"))
FILL_ALPHA = 0.4
GAP = 4  # pixels between the panels

# 5 × 7 glyphs of the six direction letters (rows top to bottom, 5 bits each, most significant left)
_GLYPHS = {
    "A": (0b01110, 0b10001, 0b10001, 0b11111, 0b10001, 0b10001, 0b10001),
    "P": (0b11110, 0b10001, 0b10001, 0b11110, 0b10000, 0b10000, 0b10000),
    "R": (0b11110, 0b10001, 0b10001, 0b11110, 0b10100, 0b10010, 0b10001),
    "L": (0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b10000, 0b11111),
    "S": (0b01111, 0b10000, 0b10000, 0b01110, 0b00001, 0b00001, 0b11110),
    "I": (0b01110, 0b00100, 0b00100, 0b00100, 0b00100, 0b00100, 0b01110),
}


def _axis_map(direction: np.ndarray) -> list[tuple[int, int]]:
    """For each patient axis (z, y, x of LPS), the array axis closest to it and its sign."""
    best = max(
        itertools.permutations(range(3)),  # world axis w ↔ array axis perm[w]; ITK index j = 2 - array axis
        key=lambda perm: sum(abs(direction[w, 2 - perm[w]]) for w in range(3)),
    )
    return [(best[w], 1 if direction[w, 2 - best[w]] >= 0 else -1) for w in (2, 1, 0)]


def canonical(array: np.ndarray, geometry: Any) -> tuple[np.ndarray, tuple[float, float, float]]:
    """``array`` ([Z, Y, X] on ``geometry``) turned to patient axes: index 0 runs inferior → superior,
    1 anterior → posterior, 2 right → left (LPS), and the spacing in that order (a view, no copy)."""
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    mapping = _axis_map(direction)
    out = np.transpose(array, [a for a, _ in mapping])
    for k, (_, sign) in enumerate(mapping):
        if sign < 0:
            out = np.flip(out, axis=k)
    spacing = tuple(float(geometry.spacing[a]) for a, _ in mapping)
    return out, (spacing[0], spacing[1], spacing[2])


def centre_of(label: np.ndarray, value: int) -> tuple[int, int, int] | None:
    """The voxel of class ``value`` nearest its centroid (so the planes cut the structure), or None."""
    where = np.nonzero(label == value)
    if where[0].size == 0:
        return None
    pts = np.stack(where, axis=1)
    centroid = pts.mean(axis=0)
    nearest = pts[int(np.argmin(((pts - centroid) ** 2).sum(axis=1)))]
    return int(nearest[0]), int(nearest[1]), int(nearest[2])


def _planes(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    k, i, j = centre
    return [volume[k], volume[:, i, :][::-1], volume[:, :, j][::-1]]


def _plane_spacing(spacing: Sequence[float]) -> list[tuple[float, float]]:
    sz, sy, sx = spacing
    return [(sy, sx), (sz, sx), (sz, sy)]


def _scaled(plane: np.ndarray, spacing: tuple[float, float], size: int) -> np.ndarray:
    """Nearest-neighbour resize of ``plane`` so that its longer physical side is ``size`` pixels."""
    rows, cols = plane.shape
    mm = max(rows * spacing[0], cols * spacing[1])
    pixel = mm / size
    h, w = max(1, round(rows * spacing[0] / pixel)), max(1, round(cols * spacing[1] / pixel))
    ri = np.minimum(((np.arange(h) + 0.5) * pixel / spacing[0]).astype(np.intp), rows - 1)
    ci = np.minimum(((np.arange(w) + 0.5) * pixel / spacing[1]).astype(np.intp), cols - 1)
    return plane[np.ix_(ri, ci)]


def _palette(values: Sequence[int]) -> tuple[np.ndarray, int]:
    """The PNG palette: ``levels`` greys, the greys blended with each label colour, then each label's
    pure colour (outlines), then white (letters); returns it and ``levels``."""
    k = len(values)
    levels = max(2, min(32, (255 - k) // (k + 1)))
    grey = np.linspace(0, 255, levels)[:, None].repeat(3, axis=1)
    colours = np.array([label_color(v) for v in values], dtype=np.float64).reshape(-1, 3)
    blends = [grey * (1 - FILL_ALPHA) + c * FILL_ALPHA for c in colours]
    table = np.concatenate([grey, *blends, colours, [[255.0, 255.0, 255.0]]])
    return np.clip(np.rint(table), 0, 255).astype(np.uint8), levels


def _outline(lab: np.ndarray) -> np.ndarray:
    """Pixels of a label whose 4-neighbourhood holds another value."""
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return edge & (lab > 0)


def _letter(canvas: np.ndarray, char: str, top: int, left: int, colour: int) -> None:
    for r, bits in enumerate(_GLYPHS[char]):
        for c in range(5):
            y, x = top + r, left + c
            if bits >> (4 - c) & 1 and 0 <= y < canvas.shape[0] and 0 <= x < canvas.shape[1]:
                canvas[y, x] = colour


def _letters(panel: np.ndarray, letters: str, colour: int) -> None:
    h, w = panel.shape
    if h < 24 or w < 24:
        return
    top, bottom, left, right = letters[0], letters[1], letters[2], letters[3]
    _letter(panel, top, 1, w // 2 - 2, colour)
    _letter(panel, bottom, h - 8, w // 2 - 2, colour)
    _letter(panel, left, h // 2 - 3, 1, colour)
    _letter(panel, right, h // 2 - 3, w - 6, colour)


def three_planes(
    image: np.ndarray,
    label: np.ndarray,
    spacing: Sequence[float],
    centre: Sequence[int],
    *,
    window: tuple[float, float],
    values: Sequence[int],
    size: int = 160,
) -> bytes:
    """A PNG of the three planes through ``centre`` of ``image`` and ``label`` (both canonical, see
    :func:`canonical`, with ``spacing`` in that order), the grey ``window`` (low, high), the label
    ``values`` coloured (others shown as background), each panel ``size`` pixels on its longer side."""
    values = [int(v) for v in values if int(v) > 0]
    palette, levels = _palette(values)
    lut = np.zeros(max([*values, int(label.max(initial=0)), 0]) + 1, dtype=np.intp)
    lut[values] = np.arange(1, len(values) + 1)
    lo, hi = float(window[0]), float(window[1])
    scale = (levels - 1) / (hi - lo) if hi > lo else 0.0
    panels = []
    for (_, letters), img, lab, sp in zip(
        PLANES, _planes(image, centre), _planes(label, centre), _plane_spacing(spacing), strict=True
    ):
        img, lab = _scaled(img, sp, size), lut[_scaled(np.clip(lab, 0, lut.size - 1), sp, size)]
        grey = np.clip(np.rint((img.astype(np.float64) - lo) * scale), 0, levels - 1).astype(np.intp)
        index = grey + lab * levels
        edge = _outline(lab)
        index[edge] = levels * (len(values) + 1) + lab[edge] - 1
        panel = index.astype(np.uint8)
        _letters(panel, letters, len(palette) - 1)
        panels.append(panel)
    height = max(p.shape[0] for p in panels)
    canvas = np.zeros((height, sum(p.shape[1] for p in panels) + GAP * (len(panels) - 1)), dtype=np.uint8)
    x = 0
    for p in panels:
        top = (height - p.shape[0]) // 2
        canvas[top : top + p.shape[0], x : x + p.shape[1]] = p
        x += p.shape[1] + GAP
    return encode_png(canvas, palette)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(index: np.ndarray, palette: np.ndarray) -> bytes:
    """An 8-bit palette PNG of ``index`` ([H, W] uint8 indices into ``palette``, [N ≤ 256, 3] uint8)."""
    h, w = index.shape
    rows = np.zeros((h, w + 1), dtype=np.uint8)  # filter byte 0 (none) before each row
    rows[:, 1:] = index
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)),
            _chunk(b"PLTE", np.ascontiguousarray(palette, dtype=np.uint8).tobytes()),
            _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)),
            _chunk(b"IEND", b""),
        ]
    )
