"""Evaluate any fixed → moving ITK transform on a pair: overlap, landmarks, regularity, similarity.

The transform is only ever used through ITK (resampling, ``TransformToDisplacementField``), so
the same numbers come out for our displacement fields, ANTs' composite ``.h5`` files, elastix
transforms exported to ITK, or a plain affine: benchmarks compare methods on equal terms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..imaging import distances, metrics
from ..imaging.colour import luminance
from ..imaging.geometry import Grid
from .landmarks import Landmarks, pair_landmarks

#: Keys of :func:`evaluation_images`, all on the fixed grid.
IMAGE_KEYS = ("fixed", "moving", "warped", "jacobian")


def _check_scalar(image: sitk.Image, what: str) -> None:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The {what} must be a scalar image, not a vector image.")


def _grey(image: sitk.Image, what: str) -> sitk.Image:
    """The image judged: a colour picture by its luminance, as it is registered."""
    grey = luminance(image)
    if grey.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The {what} must be a grey-level or colour image, not a vector image.")
    return grey


def _check_dimensions(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> None:
    dims = {fixed.GetDimension(), moving.GetDimension(), transform.GetDimension()}
    if len(dims) != 1:
        raise InputError(
            f"The fixed image is {fixed.GetDimension()}D, the moving image "
            f"{moving.GetDimension()}D and the transform {transform.GetDimension()}D; they "
            "must all have the same dimension."
        )


def displacement_on_grid(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Sample any ITK transform as a displacement field (LPS mm) on ``reference``'s grid."""
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return to_field.Execute(transform)


def evaluation_images(
    fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform
) -> dict[str, sitk.Image]:
    """Fixed, moving (identity-resampled), warped and det J, all on the fixed grid, for figures.

    Computing these once and passing them to :func:`evaluate` and :func:`write_report`
    (``images=``) avoids resampling the volumes twice.
    """
    fixed, moving = _grey(fixed, "fixed image"), _grey(moving, "moving image")
    _check_dimensions(fixed, moving, transform)
    identity = sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
    moving_float = sitk.Cast(moving, sitk.sitkFloat32)
    return {
        "fixed": sitk.Cast(fixed, sitk.sitkFloat32),
        "moving": sitk.Resample(moving_float, fixed, identity, sitk.sitkLinear, 0.0),
        "warped": sitk.Resample(moving_float, fixed, transform, sitk.sitkLinear, 0.0),
        "jacobian": metrics.jacobian_determinant(displacement_on_grid(transform, fixed)),
    }


def _overlap_mask(moving: sitk.Image, fixed: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Fixed-grid voxels whose mapped point falls inside the moving image."""
    domain = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    domain.CopyInformation(moving)
    return sitk.Resample(domain, fixed, transform, sitk.sitkNearestNeighbor, 0)


def _similarity(
    fixed: sitk.Image, moving: sitk.Image, resampled: sitk.Image, transform: sitk.Transform
) -> dict[str, float]:
    """NCC and NMI over the voxels where the moving image was actually sampled.

    Outside the moving image the resampled value is a made-up default; counting it would reward
    or punish a transform for the field of view, not for the alignment.
    """
    overlap = _overlap_mask(moving, fixed, transform)
    fraction = float(np.count_nonzero(sitk.GetArrayViewFromImage(overlap))) / math.prod(
        fixed.GetSize()
    )
    if fraction == 0:
        return {"ncc": math.nan, "nmi": math.nan, "overlap_fraction": 0.0}
    fixed_float = sitk.Cast(fixed, sitk.sitkFloat32)
    return {
        "ncc": metrics.ncc(fixed_float, resampled, overlap),
        "nmi": metrics.mutual_information(fixed_float, resampled, overlap),
        "overlap_fraction": fraction,
    }


def _summary(values: np.ndarray) -> dict[str, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return {"mean": math.nan, "std": math.nan, "median": math.nan, "max": math.nan}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "median": float(np.median(finite)),
        "max": float(finite.max()),
    }


def _jacobian_stats(jacobian: sitk.Image) -> dict[str, float]:
    det = sitk.GetArrayViewFromImage(jacobian)
    low, high = np.percentile(det, [1, 99])
    statistics = metrics.determinant_statistics(jacobian)
    return {
        "min": float(det.min()),
        "max": float(det.max()),
        "mean": float(det.mean()),
        "p1": float(low),
        "p99": float(high),
        "folding_percent": statistics.folding_percent,
        "sdlogj": statistics.sdlogj,
    }


def _label_scores(
    fixed_labels: sitk.Image,
    moving_labels: sitk.Image,
    transform: sitk.Transform,
    labels: Sequence[int] | None,
    label_names: Mapping[int, str] | None,
) -> dict[str, Any]:
    """Dice and HD95 per label on the fixed label map's grid, with Dice before registration."""
    _check_scalar(fixed_labels, "fixed label map")
    _check_scalar(moving_labels, "moving label map")
    identity = sitk.Transform(fixed_labels.GetDimension(), sitk.sitkIdentity)

    def warp(tx: sitk.Transform) -> sitk.Image:
        return sitk.Resample(moving_labels, fixed_labels, tx, sitk.sitkNearestNeighbor, 0)

    warped = warp(transform)
    after = metrics.dice_per_label(fixed_labels, warped, labels)
    before = metrics.dice_per_label(fixed_labels, warp(identity), list(after))
    names = label_names or {}
    rows = []
    for label, dice in after.items():
        rows.append(
            {
                "label": label,
                "name": names.get(label, str(label)),
                "dice": dice,
                "dice_before": before[label],
                "hd95_mm": distances.hd95(fixed_labels, warped, label),
            }
        )
    hd = np.array([row["hd95_mm"] for row in rows], dtype=np.float64)
    finite_hd = hd[np.isfinite(hd)]
    return {
        "mean_dice": metrics.mean_dice(after),
        "mean_dice_before": metrics.mean_dice(before),
        "mean_hd95_mm": float(finite_hd.mean()) if finite_hd.size else math.nan,
        "per_label": rows,
    }


def _as_landmarks(points: Landmarks | np.ndarray) -> Landmarks:
    if isinstance(points, Landmarks):
        return points
    array = np.asarray(points, dtype=np.float64)
    return Landmarks(array, [str(n) for n in range(1, len(array) + 1)])


def _landmark_scores(
    fixed_points: Landmarks | np.ndarray,
    moving_points: Landmarks | np.ndarray,
    transform: sitk.Transform,
) -> dict[str, Any]:
    fixed, moving, names = pair_landmarks(_as_landmarks(fixed_points), _as_landmarks(moving_points))
    identity = sitk.Transform(transform.GetDimension(), sitk.sitkIdentity)
    after = distances.target_registration_error(fixed, moving, transform)
    before = distances.target_registration_error(fixed, moving, identity)
    return {
        "count": len(names),
        "tre_mm": _summary(after),
        "tre_before_mm": _summary(before),
        "per_point": [
            {"name": name, "tre_mm": float(a), "tre_before_mm": float(b)}
            for name, a, b in zip(names, after, before, strict=True)
        ],
    }


def json_ready(value: Any) -> Any:
    """Plain Python with string keys (as a JSON round trip gives); nan and inf → None."""
    if isinstance(value, Mapping):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    return value


def evaluate(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    *,
    fixed_labels: sitk.Image | None = None,
    moving_labels: sitk.Image | None = None,
    fixed_landmarks: Landmarks | np.ndarray | None = None,
    moving_landmarks: Landmarks | np.ndarray | None = None,
    inverse_transform: sitk.Transform | None = None,
    label_names: Mapping[int, str] | None = None,
    labels: Sequence[int] | None = None,
    images: Mapping[str, sitk.Image] | None = None,
) -> dict[str, Any]:
    """Every quality measure for one registered pair, as a JSON-ready dict.

    ``transform`` maps fixed → moving points (ITK's resampling direction); ``inverse_transform``
    maps moving → fixed. Labels are compared on the fixed label map's grid after warping the
    moving labels with nearest neighbour; "before" values use the identity transform, i.e. the
    images as they lie in physical space. Undefined or infinite values (a label missing from
    both maps, an empty structure's HD95) are ``None``. ``images`` takes a precomputed
    :func:`evaluation_images` result. Colour pictures are judged by their luminance.
    """
    fixed, moving = _grey(fixed, "fixed image"), _grey(moving, "moving image")
    _check_dimensions(fixed, moving, transform)
    if (fixed_labels is None) != (moving_labels is None):
        raise InputError("Give both the fixed and the moving label maps, or neither.")
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise InputError("Give both the fixed and the moving landmarks, or neither.")
    if images is None:
        images = evaluation_images(fixed, moving, transform)
    missing = set(IMAGE_KEYS) - set(images)
    if missing:
        raise InputError(f"images= lacks {', '.join(sorted(missing))}; use evaluation_images().")
    identity = sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
    grid = Grid.of(fixed)
    result: dict[str, Any] = {
        "dimension": grid.dim,
        "transform": transform.GetName(),
        "fixed_grid": {
            "size": grid.size,
            "spacing": grid.spacing,
            "origin": grid.origin,
            "direction": grid.direction,
        },
        "similarity": {
            "before": _similarity(fixed, moving, images["moving"], identity),
            "after": _similarity(fixed, moving, images["warped"], transform),
        },
        "jacobian": _jacobian_stats(images["jacobian"]),
    }
    if fixed_labels is not None and moving_labels is not None:
        result["labels"] = _label_scores(
            fixed_labels, moving_labels, transform, labels, label_names
        )
    if fixed_landmarks is not None and moving_landmarks is not None:
        result["landmarks"] = _landmark_scores(fixed_landmarks, moving_landmarks, transform)
    if inverse_transform is not None:
        if inverse_transform.GetDimension() != grid.dim:
            raise InputError(
                f"The inverse transform is {inverse_transform.GetDimension()}D, the images "
                f"{grid.dim}D."
            )
        result["inverse_consistency"] = distances.inverse_consistency_error(
            displacement_on_grid(transform, fixed), displacement_on_grid(inverse_transform, moving)
        )
    return json_ready(result)


def read_label_names(path: str | Path) -> dict[int, str]:
    """Label names from a FreeSurfer LUT or a Slicer colour table (``index name r g b a``).

    Both formats share the first two columns, which are all that naming a Dice table needs;
    ``#`` starts a comment.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read the label-name table {path}: {error}.") from error
    names = {}
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) < 2 or not fields[0].lstrip("-").isdigit():
            raise InputError(
                f"{path}, line {number}: expected 'index name r g b a' (a colour table such as "
                f"FreeSurferColorLUT.txt or a Slicer .ctbl), found {line.strip()!r}."
            )
        names[int(fields[0])] = fields[1]
    if not names:
        raise InputError(f"The label-name table {path} has no entries.")
    return names
