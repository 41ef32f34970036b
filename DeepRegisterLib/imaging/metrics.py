"""Registration quality measures, computed in physical space (LPS mm) on SimpleITK images.

Every measure takes images (not arrays) so that spacing and direction are never forgotten: a
Jacobian taken in voxel units on an anisotropic grid, or a Dice between label maps on different
grids, is a silently wrong number. Inputs that cannot give a meaningful value raise
:class:`~DeepRegisterLib.errors.InputError`; values that are merely undefined (an empty label, a
constant image) come back as ``nan`` so a report can still be written.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError, stop_if_cancelled
from .geometry import Grid
from .volumes import allocate, paste_rows

#: The 27 FreeSurfer ``aseg`` structures used for brain-registration Dice (as in SynthMorph and
#: most Learn2Reg-style evaluations): cortex, white matter, ventricles and deep grey matter.
FREESURFER_EVAL_LABELS: tuple[int, ...] = (
    2, 3, 4, 7, 8, 10, 11, 12, 13, 16, 17, 18, 26, 28,
    41, 42, 43, 46, 47, 49, 50, 51, 52, 53, 54, 58, 60,
)  # fmt: skip

_GRID_ATOL = 1e-4  # mm (and direction cosines): file round trips jitter the last digits
_JACOBIAN_CLIP = (1e-9, 1e9)
_BINCOUNT_MAX_LABEL = 1 << 16  # label values below this are counted with np.bincount
_COUNT_CHUNK = 1 << 18  # voxels per bincount: a few MB, in cache


def parse_labels(tokens: Sequence[str] | None, option: str) -> list[int] | None:
    """Label numbers from command-line words; the word ``freesurfer`` means the 27 standard
    evaluation structures. ``option`` names the flag in the error message."""
    if tokens is None:
        return None
    if [t.lower() for t in tokens] == ["freesurfer"]:
        return list(FREESURFER_EVAL_LABELS)
    try:
        return [int(t) for t in tokens]
    except ValueError:
        raise InputError(
            f"{option} takes integers or the word 'freesurfer', not {' '.join(tokens)!r}."
        ) from None


def same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    """Whether two images share size, spacing, origin and direction (to file round-off)."""
    ga, gb = Grid.of(a), Grid.of(b)
    return (
        ga.size == gb.size
        and np.allclose(ga.spacing, gb.spacing, atol=_GRID_ATOL)
        and np.allclose(ga.origin, gb.origin, atol=_GRID_ATOL)
        and np.allclose(ga.direction, gb.direction, atol=_GRID_ATOL)
    )


def require_same_grid(a: sitk.Image, b: sitk.Image, what: str) -> None:
    if not same_grid(a, b):
        raise InputError(
            f"{what} are not on the same grid (size {a.GetSize()} vs {b.GetSize()}, spacing "
            f"{a.GetSpacing()} vs {b.GetSpacing()}, origin {a.GetOrigin()} vs {b.GetOrigin()}); "
            "resample one onto the other first (nearest neighbour for label maps)."
        )


def scalar_array(image: sitk.Image, what: str) -> np.ndarray:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a scalar image, not a vector image.")
    return sitk.GetArrayViewFromImage(image)


def mask_array(mask: sitk.Image | None, reference: sitk.Image) -> np.ndarray | None:
    """The mask as booleans on ``reference``'s grid; an empty mask would make every mean nan."""
    if mask is None:
        return None
    require_same_grid(mask, reference, "The mask and the image")
    inside = scalar_array(mask, "The mask") != 0
    if not inside.any():
        raise InputError("The mask is empty (all zero); give a mask that covers the region.")
    return inside


def check_displacement(displacement: sitk.Image) -> None:
    dim = displacement.GetDimension()
    if displacement.GetNumberOfComponentsPerPixel() != dim:
        raise InputError(
            f"A displacement field needs {dim} components per voxel (one per axis, LPS mm); "
            f"this image has {displacement.GetNumberOfComponentsPerPixel()}."
        )


_JACOBIAN_BLOCK_VOXELS = 1 << 21  # voxels per slab: ~100 MB of float32 working arrays


def determinant_block(components: Sequence[np.ndarray], to_index: np.ndarray) -> np.ndarray:
    """det(I + ∂u/∂x) on one block of a displacement ``u``, from its components (each a
    (K, J, I) or (J, I) array, LPS mm) and ``to_index`` = the grid's (index q, physical r)
    matrix: derivatives by central differences along index axes (one-sided at the block's
    faces), mapped to millimetres. Built one row of the matrix at a time, in float32, each
    operation into an array already made: a torso CT's det J is 157 million voxels."""
    dim = len(components)
    shape = np.shape(components[0])
    rows = []
    for p, component in enumerate(components):
        component = np.asarray(component, dtype=np.float32)
        # Entries stay scalars (δ_pr) until a derivative lands on them: no constant arrays.
        row: list[float | np.ndarray] = [float(p == r) for r in range(dim)]
        for q in range(dim):  # ITK axis q is array axis dim - 1 - q
            if shape[dim - 1 - q] < 2:
                continue
            du_dq = _difference(component, dim - 1 - q)
            # Axis-aligned grids map each index axis to one physical axis: one term, no copy.
            targets = [r for r in range(dim) if to_index[q, r] != 0]
            for r in targets:
                term = du_dq if r == targets[-1] else du_dq.copy()
                term *= np.float32(to_index[q, r])
                entry = row[r]
                if isinstance(entry, np.ndarray):
                    entry += term
                else:
                    term += entry
                    row[r] = term
        rows.append(row)
    if dim == 2:
        det = rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0]
    else:  # a(ei − fh) − b(di − fg) + c(dh − eg), in that order, into two arrays
        (a, b, c), (d, e, f), (g, h, i) = rows
        det = e * i
        det -= f * h
        det *= a
        minor = d * i
        minor -= f * g
        minor *= b
        det -= minor
        minor = d * h
        minor -= e * g
        minor *= c
        det += minor
    return np.full(shape, det, dtype=np.float32) if np.ndim(det) == 0 else det


def _difference(component: np.ndarray, axis: int) -> np.ndarray:
    """``np.gradient(component, axis=axis, edge_order=1)``, the same values written straight
    into one array, where NumPy's makes a temporary for each difference and each halving."""
    out = np.empty_like(component)
    values, differences = np.moveaxis(component, axis, 0), np.moveaxis(out, axis, 0)
    np.subtract(values[2:], values[:-2], out=differences[1:-1])
    differences[1:-1] /= 2.0
    np.subtract(values[1], values[0], out=differences[0])
    np.subtract(values[-1], values[-2], out=differences[-1])
    return out


def jacobian_determinant(
    displacement: sitk.Image, is_cancelled: Callable[[], bool] | None = None
) -> sitk.Image:
    """det(I + ∂u/∂x) of a displacement field, in physical coordinates, as float32.

    Derivatives are taken per index axis with central differences and mapped to millimetres with
    ``(D·diag(spacing))⁻¹``, so the value is right on oblique, anisotropic grids. The field is
    read without a copy and processed in slabs (with a one-slice halo, so the result equals the
    whole-volume computation) to keep a 256³ field within a few hundred MB. An axis of length 1
    contributes no derivative (a one-slice volume is treated as a slab). ``is_cancelled`` is
    asked before each slab; when it answers True, ``RegistrationCancelled`` is raised.
    """
    check_displacement(displacement)
    field = sitk.GetArrayViewFromImage(displacement)
    grid = Grid.of(displacement)
    to_index = np.linalg.inv(grid.index_to_physical)  # (index q, physical r)
    image = allocate(grid, sitk.sitkFloat32, is_cancelled=is_cancelled)
    for start, stop in slabs(grid.shape, is_cancelled):
        lower, upper = max(start - 1, 0), min(stop + 1, grid.shape[0])
        block = field[lower:upper]
        values = determinant_block([block[..., p] for p in range(grid.dim)], to_index)
        paste_rows(image, values[start - lower : stop - lower], start)
    return image


def slabs(
    shape: Sequence[int], is_cancelled: Callable[[], bool] | None = None
) -> Iterator[tuple[int, int]]:
    """(start, stop) rows of an array of ``shape``, about 2 million voxels at a time: a 512² ×
    600 field's det J or statistics would otherwise need several float64 copies of it at once,
    and could not be cancelled."""
    step = max(1, _JACOBIAN_BLOCK_VOXELS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], step):
        stop_if_cancelled(is_cancelled, "while computing det J")
        yield start, min(start + step, shape[0])


class DeterminantStatistics:
    """Folding (% det J ≤ 0) and SDlogJ, gathered a slab at a time.

    det J is clipped to [1e-9, 1e9] before its log, so folded voxels count as a large (finite)
    penalty instead of turning SDlogJ into nan. Slabs are merged with Chan et al.'s pairwise
    update of the mean and the sum of squared deviations, as accurate as one pass over all.
    """

    def __init__(self) -> None:
        self.count = self.folded = 0
        self.mean = self.squares = 0.0

    def add(self, values: np.ndarray) -> None:
        if values.size == 0:
            return
        logs = values.astype(np.float64)  # one array, each step in place
        np.log(np.clip(logs, *_JACOBIAN_CLIP, out=logs), out=logs)
        mean = float(logs.mean())
        logs -= mean
        squares = float(np.square(logs, out=logs).sum())
        self._merge(values.size, int(np.count_nonzero(values <= 0)), mean, squares)

    def add_constant(self, value: float, count: int) -> None:
        """``count`` voxels of det J ``value``, without an array of them."""
        if count > 0:
            log = math.log(min(max(value, _JACOBIAN_CLIP[0]), _JACOBIAN_CLIP[1]))
            self._merge(count, count if value <= 0 else 0, log, 0.0)

    def _merge(self, count: int, folded: int, mean: float, squares: float) -> None:
        """Adds ``count`` voxels with this mean log and sum of squared deviations from it."""
        delta, merged = mean - self.mean, self.count + count
        self.mean += delta * count / merged
        self.squares += squares + delta * delta * self.count * count / merged
        self.count, self.folded = merged, self.folded + folded

    @property
    def folding_percent(self) -> float:
        return 100.0 * self.folded / self.count

    @property
    def sdlogj(self) -> float:
        return math.sqrt(self.squares / self.count)


def determinant_statistics(
    jacobian: sitk.Image,
    mask: sitk.Image | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> DeterminantStatistics:
    """:class:`DeterminantStatistics` of a det J image, within ``mask`` if given."""
    det = scalar_array(jacobian, "The Jacobian determinant")
    inside = mask_array(mask, jacobian)
    statistics = DeterminantStatistics()
    for start, stop in slabs(det.shape, is_cancelled):
        values = det[start:stop]
        statistics.add(values if inside is None else values[inside[start:stop]])
    return statistics


def folding_percent(
    jacobian: sitk.Image,
    mask: sitk.Image | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> float:
    """Percentage of voxels (within ``mask``) where det J ≤ 0: where the transform folds."""
    return determinant_statistics(jacobian, mask, is_cancelled).folding_percent


def sdlogj(
    jacobian: sitk.Image,
    mask: sitk.Image | None = None,
    is_cancelled: Callable[[], bool] | None = None,
) -> float:
    """Standard deviation of log det J: smoothness of the field, comparable across methods."""
    return determinant_statistics(jacobian, mask, is_cancelled).sdlogj


def _label_array(image: sitk.Image, what: str) -> np.ndarray:
    """The voxels as a flat integer array: integer types as they are (no copy), integer-valued
    floats converted."""
    array = scalar_array(image, what)
    if np.issubdtype(array.dtype, np.integer):
        return array.ravel()
    if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
        raise InputError(
            f"{what} has non-integer values; give a label map (integer voxels), or resample "
            "it with nearest-neighbour interpolation."
        )
    return array.astype(np.int64).ravel()


def dice_per_label(
    fixed_labels: sitk.Image,
    warped_labels: sitk.Image,
    labels: Sequence[int] | None = None,
) -> dict[int, float]:
    """Dice overlap 2|A∩B| / (|A|+|B|) for each label.

    By default the labels are the non-zero ones present in ``fixed_labels`` (the reference). A
    label absent from both maps has no defined overlap and gets ``nan``, which
    :func:`mean_dice` leaves out. Counts come from one pass over the voxels, not one per label.
    """
    require_same_grid(fixed_labels, warped_labels, "The fixed and warped label maps")
    fixed = _label_array(fixed_labels, "The fixed label map")
    warped = _label_array(warped_labels, "The warped label map")
    n_fixed, n_warped, n_both = _label_counts(fixed, warped)
    if labels is None:  # ascending, as the counts are
        labels = [label for label in n_fixed if label != 0]
    dice = {}
    for label in labels:
        label = int(label)
        total = n_fixed.get(label, 0) + n_warped.get(label, 0)
        dice[label] = 2.0 * n_both.get(label, 0) / total if total else float("nan")
    return dice


def _label_counts(fixed: np.ndarray, warped: np.ndarray) -> tuple[dict[int, int], ...]:
    """Voxels per label in ``fixed``, in ``warped``, and where both agree.

    Small non-negative labels are counted with np.bincount in chunks that stay in the CPU's
    cache: on whole 256³ volumes the int64 copies and the sort of np.unique took a second.
    """
    low = min(int(fixed.min(initial=0)), int(warped.min(initial=0)))
    high = max(int(fixed.max(initial=0)), int(warped.max(initial=0)))
    if low < 0 or high >= _BINCOUNT_MAX_LABEL:
        counted = (
            np.unique(v, return_counts=True) for v in (fixed, warped, fixed[fixed == warped])
        )
        return tuple(
            dict(zip(labels.tolist(), count.tolist(), strict=True)) for labels, count in counted
        )
    totals = np.zeros((3, high + 1), dtype=np.int64)
    for start in range(0, fixed.size, _COUNT_CHUNK):
        f, w = fixed[start : start + _COUNT_CHUNK], warped[start : start + _COUNT_CHUNK]
        for row, values in enumerate((f, w, f[f == w])):
            totals[row] += np.bincount(values, minlength=high + 1)
    present = [np.flatnonzero(row) for row in totals]
    return tuple(
        dict(zip(labels.tolist(), row[labels].tolist(), strict=True))
        for labels, row in zip(present, totals, strict=True)
    )


def mean_dice(per_label: Mapping[int, float]) -> float:
    """Mean Dice over labels, ignoring the ``nan`` of labels absent from both maps."""
    values = np.asarray(list(per_label.values()), dtype=np.float64)
    if values.size == 0 or np.all(np.isnan(values)):
        return float("nan")
    return float(np.nanmean(values))


def _paired_values(
    a: sitk.Image, b: sitk.Image, mask: sitk.Image | None
) -> tuple[np.ndarray, np.ndarray]:
    require_same_grid(a, b, "The two images")
    va = scalar_array(a, "The first image").astype(np.float64)
    vb = scalar_array(b, "The second image").astype(np.float64)
    inside = mask_array(mask, a)
    if inside is not None:
        va, vb = va[inside], vb[inside]
    finite = np.isfinite(va) & np.isfinite(vb)
    return va[finite].ravel(), vb[finite].ravel()


def ncc(a: sitk.Image, b: sitk.Image, mask: sitk.Image | None = None) -> float:
    """Global Pearson correlation of two images on one grid (within ``mask``).

    ``nan`` when either image is constant there: correlation is undefined, not zero.
    """
    va, vb = _paired_values(a, b, mask)
    va, vb = va - va.mean(), vb - vb.mean()
    denominator = np.sqrt(np.dot(va, va) * np.dot(vb, vb))
    return float(np.dot(va, vb) / denominator) if denominator > 0 else float("nan")


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


def mutual_information(
    a: sitk.Image, b: sitk.Image, mask: sitk.Image | None = None, bins: int = 32
) -> float:
    """Normalised mutual information (H(a)+H(b)) / H(a,b), in [1, 2].

    Normalised so values compare across image pairs with different overlap and contrast; it
    works for multi-modal pairs where NCC does not. ``nan`` when both images are constant.
    """
    if bins < 2:
        raise InputError(f"Mutual information needs at least 2 histogram bins, not {bins}.")
    va, vb = _paired_values(a, b, mask)
    joint, _, _ = np.histogram2d(va, vb, bins=bins)
    h_joint = _entropy(joint.ravel())
    if h_joint == 0:
        return float("nan")
    return (_entropy(joint.sum(axis=1)) + _entropy(joint.sum(axis=0))) / h_joint
