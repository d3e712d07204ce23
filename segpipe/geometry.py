"""`Geometry`: where an array sits in physical space.

This module is the ONE place where SimpleITK's (x, y, z) order meets numpy's (z, y, x).
Conventions, used everywhere in segpipe:

* ``shape`` and ``spacing`` are in **array order** ``(z, y, x)``: ``spacing[i]`` is the
  distance in mm between neighbouring voxels along array axis ``i``.
* ``origin`` is the physical position (LPS, mm, as in DICOM and ITK) of voxel ``[0, 0, 0]``,
  given as ``(x, y, z)`` world coordinates.
* ``direction`` is ITK's 3×3 direction matrix (row-major, 9 numbers): column ``j`` is the
  unit world vector of ITK index axis ``j`` (``j = 0`` is x, the *last* array axis).

2-D images are treated as volumes with one slice (``shape[0] == 1``, spacing 1 mm along z).

``oriented`` is False for a grid whose file declared no orientation (a NIfTI with qform and
sform codes 0): origin and direction are then nibabel's default placement, which other readers
(ITK, SimpleITK) do not share, and a NIfTI written on that same grid is written without
orientation too, so that each reader places it where it places the source.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .errors import DataError

# Default tolerances for "same grid" comparisons.
SPACING_RTOL = 1e-3
ORIGIN_TOL_FRACTION = 0.05  # of the smallest spacing
DIRECTION_ATOL = 1e-3


class GeometryError(DataError, ValueError):
    """An impossible voxel grid (zero or NaN spacing, empty shape, ...).

    A :class:`~segpipe.errors.DataError` (exit 3) and, for callers that catch ``ValueError``,
    a ``ValueError``. Readers catch it and add the file name and the fix.
    """


def _tuple(values: Sequence[float], n: int, name: str) -> tuple[float, ...]:
    out = tuple(float(v) for v in values)
    if len(out) != n:
        raise GeometryError(f"Geometry.{name} needs {n} values, got {len(out)}")
    if not all(np.isfinite(out)):
        raise GeometryError(f"Geometry.{name} has non-finite values: {out}")
    return out


@dataclass(frozen=True)
class Geometry:
    """Voxel grid of a 3-D image: ``shape``/``spacing`` in (z, y, x), LPS ``origin``/``direction``."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    oriented: bool = field(default=True, compare=False)  # False: the file gave no orientation (module docstring)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise GeometryError(f"Geometry.shape must be 3 positive sizes (z, y, x), got {self.shape}")
        spacing = _tuple(self.spacing, 3, "spacing")
        if min(spacing) <= 0:
            raise GeometryError(f"Geometry.spacing must be positive, got {spacing}")
        direction = _tuple(np.asarray(self.direction, dtype=float).ravel().tolist(), 9, "direction")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", _tuple(self.origin, 3, "origin"))
        object.__setattr__(self, "direction", direction)
        object.__setattr__(self, "oriented", bool(self.oriented))

    # ------------------------------------------------------------------ SimpleITK
    @classmethod
    def from_sitk(cls, image: Any) -> "Geometry":
        """Geometry of a SimpleITK image (2-D, 3-D, or the first three axes of 4-D)."""
        dim = image.GetDimension()
        size = list(image.GetSize())
        spacing = list(image.GetSpacing())
        origin = list(image.GetOrigin())
        direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
        if dim == 2:
            size, spacing, origin = size + [1], spacing + [1.0], origin + [0.0]
            d3 = np.eye(3)
            d3[:2, :2] = direction
            direction = d3
        elif dim >= 4:
            size, spacing, origin = size[:3], spacing[:3], origin[:3]
            direction = direction[:3, :3]
        elif dim != 3:
            raise GeometryError(f"unsupported image dimension {dim}")
        return cls(
            shape=tuple(reversed(size)),
            spacing=tuple(reversed(spacing)),
            origin=tuple(origin),
            direction=tuple(direction.ravel()),
        )

    @property
    def sitk_size(self) -> tuple[int, int, int]:
        """Size in SimpleITK's (x, y, z) order."""
        return tuple(reversed(self.shape))  # type: ignore[return-value]

    @property
    def sitk_spacing(self) -> tuple[float, float, float]:
        """Spacing in SimpleITK's (x, y, z) order."""
        return tuple(reversed(self.spacing))  # type: ignore[return-value]

    def apply_to_sitk(self, image: Any) -> Any:
        """Stamp this geometry onto a 3-D SimpleITK image (sizes must agree); returns it."""
        if tuple(image.GetSize()[:3]) != self.sitk_size:
            raise ValueError(f"image size {image.GetSize()} does not match geometry {self.sitk_size}")
        image.SetSpacing(self.sitk_spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_sitk(self, array: np.ndarray) -> Any:
        """A SimpleITK image from a (z, y, x) array with this geometry."""
        import SimpleITK as sitk

        arr = np.asarray(array)
        if arr.shape != self.shape:
            raise ValueError(f"array shape {arr.shape} does not match geometry shape {self.shape}")
        return self.apply_to_sitk(sitk.GetImageFromArray(arr))

    # ------------------------------------------------------------------ matrices
    @property
    def direction_matrix(self) -> np.ndarray:
        """3×3 ITK direction (columns: world vectors of index axes x, y, z)."""
        return np.asarray(self.direction, dtype=float).reshape(3, 3)

    @property
    def index_to_world_matrix(self) -> np.ndarray:
        """4×4 matrix mapping homogeneous numpy indices (z, y, x, 1) to LPS world (x, y, z, 1)."""
        m = np.eye(4)
        # world = origin + D @ diag(spacing_xyz) @ (x, y, z); reorder columns for (z, y, x) input.
        ds = self.direction_matrix @ np.diag(self.sitk_spacing)
        m[:3, :3] = ds[:, ::-1]
        m[:3, 3] = self.origin
        return m

    def index_to_world(self, index_zyx: np.ndarray) -> np.ndarray:
        """World LPS points (…, 3) of numpy indices (…, 3) in (z, y, x) order."""
        idx = np.asarray(index_zyx, dtype=float)
        m = self.index_to_world_matrix
        return idx @ m[:3, :3].T + m[:3, 3]

    def world_to_index(self, points_xyz: np.ndarray) -> np.ndarray:
        """Continuous numpy indices (z, y, x) of world LPS points (…, 3)."""
        pts = np.asarray(points_xyz, dtype=float)
        m = np.linalg.inv(self.index_to_world_matrix)
        return pts @ m[:3, :3].T + m[:3, 3]

    def nifti_affine(self) -> np.ndarray:
        """NIfTI (RAS) affine mapping (i, j, k) = (x, y, z) voxel indices to RAS mm."""
        lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
        m = np.eye(4)
        m[:3, :3] = self.direction_matrix @ np.diag(self.sitk_spacing)
        m[:3, 3] = self.origin
        return lps_to_ras @ m

    @classmethod
    def from_nifti_affine(cls, affine: np.ndarray, shape_xyz: Sequence[int]) -> "Geometry":
        """Geometry from a NIfTI (RAS) affine and the (x, y, z) voxel shape, as nibabel gives them."""
        ras_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0])
        m = ras_to_lps @ np.asarray(affine, dtype=float)
        zooms = np.linalg.norm(m[:3, :3], axis=0)
        direction = m[:3, :3] / zooms
        return cls(
            shape=tuple(int(s) for s in reversed(list(shape_xyz)[:3])),  # type: ignore[arg-type]
            spacing=tuple(reversed(zooms.tolist())),
            origin=tuple(m[:3, 3].tolist()),
            direction=tuple(direction.ravel().tolist()),
        )

    def orientation_code(self) -> str:
        """Three-letter LPS-convention axis code of index axes x, y, z (e.g. ``'LPS'``, ``'RAS'``)."""
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        code = ""
        for j in range(3):
            col = self.direction_matrix[:, j]
            k = int(np.argmax(np.abs(col)))
            code += letters[k][0] if col[k] > 0 else letters[k][1]
        return code

    # ------------------------------------------------------------------ comparisons
    def differences(
        self,
        other: "Geometry",
        *,
        spacing_rtol: float = SPACING_RTOL,
        origin_tol_fraction: float = ORIGIN_TOL_FRACTION,
        direction_atol: float = DIRECTION_ATOL,
        check_shape: bool = True,
        names: tuple[str, str] | None = None,
    ) -> list[str]:
        """Human-readable list of the ways ``other`` is not the same voxel grid (empty: same).

        Each item gives this grid's value first, then ``other``'s. With ``names`` (this grid's
        name, the other's) each value is labelled: ``"shape: label (6, 5, 12) vs image (6, 10, 12)"``.
        """
        mine, theirs = names if names is not None else ("", "")

        def item(what: str, a: Sequence[float], b: Sequence[float]) -> str:
            if names is None:
                return f"{what} {_fmt(a)} vs {_fmt(b)}"
            return f"{what}: {mine} {_fmt(a)} vs {theirs} {_fmt(b)}"

        out: list[str] = []
        if check_shape and self.shape != other.shape:
            out.append(item("shape", self.shape, other.shape))
        if not np.allclose(self.spacing, other.spacing, rtol=spacing_rtol, atol=0):
            out.append(item("spacing", self.spacing, other.spacing))
        tol = origin_tol_fraction * min(self.spacing)
        if np.max(np.abs(np.subtract(self.origin, other.origin))) > tol:
            out.append(item("origin", self.origin, other.origin))
        if not np.allclose(self.direction, other.direction, atol=direction_atol, rtol=0):
            out.append(item("direction", self.direction, other.direction))
        return out

    def same_grid(self, other: "Geometry", **tolerances: float) -> bool:
        """True when ``other`` describes the same voxel grid within tolerances."""
        return not self.differences(other, **tolerances)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ misc
    def replace(self, **changes: Any) -> "Geometry":
        return replace(self, **changes)

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        """Physical size (z, y, x) in mm of the voxel grid (shape × spacing)."""
        return tuple(float(n * s) for n, s in zip(self.shape, self.spacing))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "shape": list(self.shape),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }
        if not self.oriented:  # only then: the records of oriented grids stay as they were
            out["oriented"] = False
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Geometry":
        return cls(
            shape=tuple(data["shape"]),
            spacing=tuple(data["spacing"]),
            origin=tuple(data["origin"]),
            direction=tuple(data["direction"]),
            oriented=bool(data.get("oriented", True)),
        )


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
