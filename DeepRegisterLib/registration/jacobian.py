"""det J of a result's transform and its QA figures (folding, SDlogJ), from the deformation.

The transform is ``T(x) = A(x + v(x))``, so ``det ∇T = det A · det(I + ∇v)``: det J needs the
differences of ``v`` alone, and only in the box where ``v`` is non-zero (a third of a 1 mm
head); beyond the box it is ``det A``, which the figures count without an array. Differencing
the dense displacement ``u = T(x) − x`` instead builds three affine ramps per voxel first, and
loses float32 bits to them. The image is made only when asked for: a report alone needs no
67 MB det J of a 256³ brain.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..imaging import metrics
from ..imaging.geometry import Grid
from ..imaging.volumes import allocate, paste_block
from .warping import Displacement, deformed_box


def jacobian_and_qa(
    field: Displacement,
    matrix: np.ndarray,
    network_grid: Grid,
    region: sitk.Image | None,
    keep_image: bool,
    is_cancelled: Callable[[], bool],
) -> tuple[sitk.Image | None, dict[str, Any]]:
    """det J on ``field``'s grid (if ``keep_image``), and folding and SDlogJ within ``region``
    (the fixed mask) or the whole grid. ``matrix`` is the affine's linear part."""
    grid = field.grid
    box = deformed_box(network_grid, grid)
    outside = float(np.float32(np.linalg.det(matrix)))  # as the image holds it
    inside = None if region is None else sitk.GetArrayViewFromImage(region) != 0
    image = allocate(grid, sitk.sitkFloat32, is_cancelled=is_cancelled) if keep_image else None
    if image is not None and outside != 0.0:
        image += outside
    statistics = metrics.DeterminantStatistics()
    rows, *across = box
    to_index = np.linalg.inv(grid.index_to_physical)  # (index q, physical r)
    for first, last in metrics.slabs((rows.stop - rows.start, *grid.shape[1:]), is_cancelled):
        start, stop = rows.start + first, rows.start + last
        # One row of halo each side, within the box: the slabs give the whole box's differences.
        lower, upper = max(start - 1, rows.start), min(stop + 1, rows.stop)
        v = field.deformation((slice(lower, upper), *across)).cpu().numpy()
        values = metrics.determinant_block(list(v), to_index)[start - lower : stop - lower]
        values *= outside
        block = (slice(start, stop), *across)
        statistics.add(values if inside is None else values[inside[block]])
        if image is not None:
            paste_block(image, values, block)
    within = math.prod(grid.shape) if inside is None else int(np.count_nonzero(inside))
    statistics.add_constant(outside, within - _count_in(box, inside))
    qa = {"folding_percent": statistics.folding_percent, "sdlogj": statistics.sdlogj}
    return image, qa


def _count_in(box: tuple[slice, ...], inside: np.ndarray | None) -> int:
    if inside is None:
        return math.prod(s.stop - s.start for s in box)
    return int(np.count_nonzero(inside[box]))
