"""What one registration hands back: images on the fixed grid, the transform, and its QA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk

from ..imaging.geometry import Grid


def displacement_transform(displacement: sitk.Image) -> sitk.DisplacementFieldTransform:
    """A fresh ITK transform over a copy of ``displacement`` (ITK takes the image it is given)."""
    field_copy = sitk.Cast(displacement, sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field_copy)
    transform.SetInterpolator(sitk.sitkLinear)
    return transform


@dataclass
class RegistrationResult:
    """The outcome of :func:`DeepRegisterLib.register`.

    ``displacement`` is THE transform: a vector image (float64, LPS mm) on the fixed image's grid
    with ``T(x) = x + u(x)`` mapping fixed points to moving points, so that
    ``warped(x) = moving(T(x))`` — ITK's resampling transform and Slicer's "FromParent".
    """

    fixed_grid: Grid
    displacement: sitk.Image
    warped: sitk.Image | None  # None when the settings' compute_warped is off
    affine: sitk.Transform
    warped_labels: dict[str, sitk.Image] = field(default_factory=dict)
    jacobian: sitk.Image | None = None
    inverse_displacement: sitk.Image | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def transform(self) -> sitk.DisplacementFieldTransform:
        """The total fixed → moving transform (affine ∘ deformable) as an ITK transform."""
        return displacement_transform(self.displacement)

    def inverse_transform(self) -> sitk.DisplacementFieldTransform | None:
        """Moving → fixed, sampled on the moving grid; ``None`` unless the inverse was asked for."""
        if self.inverse_displacement is None:
            return None
        return displacement_transform(self.inverse_displacement)
