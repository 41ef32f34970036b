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

    ``displacement`` is THE transform: a vector image (float32, LPS mm) on the fixed image's grid
    with ``T(x) = x + u(x)`` mapping fixed points to moving points, so that
    ``warped(x) = moving(T(x))`` — ITK's resampling transform and Slicer's "FromParent".
    The engine also hands back how it is made, ``T(x) = A(x + v(x))`` with ``v`` (``deformation``)
    on the network grid, which :meth:`transform` gives as ITK's composite (as ANTs writes its
    transforms): the same map to float32 rounding, in a twentieth of the bytes on a brain. With
    the settings' ``compute_displacement`` off, ``displacement`` is None and that composite is
    the transform. The field is float32 because the engine computes it so; ITK's transforms
    take float64, which :meth:`transform` hands them.
    """

    fixed_grid: Grid
    displacement: sitk.Image | None
    warped: sitk.Image | None  # None when the settings' compute_warped is off
    affine: sitk.Transform
    warped_labels: dict[str, sitk.Image] = field(default_factory=dict)
    jacobian: sitk.Image | None = None
    inverse_displacement: sitk.Image | None = None  # dense, on the moving grid (see settings)
    report: dict[str, Any] = field(default_factory=dict)
    deformation: sitk.Image | None = None  # v; None: the transform is the displacement alone
    inverse_deformation: sitk.Image | None = None  # w = exp(−v): the inverse is [w, A⁻¹]

    def transform(self) -> sitk.Transform:
        """The total fixed → moving transform as an ITK transform: ``[affine, v]`` (ITK applies
        the last first) when the deformation is known, else the displacement field."""
        if self.deformation is None:
            return displacement_transform(self.displacement)
        return sitk.CompositeTransform([self.affine, displacement_transform(self.deformation)])

    def inverse_transform(self) -> sitk.Transform | None:
        """Moving → fixed: ``[w, affine⁻¹]``, or the field on the moving grid; ``None`` unless
        the inverse was asked for."""
        if self.inverse_deformation is not None:
            return sitk.CompositeTransform(
                [displacement_transform(self.inverse_deformation), self.affine.GetInverse()]
            )
        if self.inverse_displacement is None:
            return None
        return displacement_transform(self.inverse_displacement)
