"""The inputs of one call, read and checked: every refusal that needs no plan, before any work.

No torch here: the inputs are read and checked while torch loads beside them (see
engine.py); the plan that needs torch (device, model, memory) is job.py's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import SimpleITK as sitk

from ..errors import InputError
from ..imaging.colour import LUMINANCE_NOTE, is_colour, luminance
from ..imaging.fileio import read_image
from ..imaging.geometry import is_linear
from ..imaging.intensity_window import IntensityWindow
from .image_checks import check_intensity_image, check_label_map, check_same_dimension, mask_on_grid
from .presets import Preset
from .progress import Stages
from .settings import RegistrationSettings

ImageLike = sitk.Image | str | os.PathLike


@dataclass(frozen=True)
class Inputs:
    """The images and the settings of one call, checked."""

    fixed_image: sitk.Image
    moving_image: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    label_maps: dict[str, sitk.Image]
    fixed_labels: sitk.Image | None
    initial_transform: sitk.Transform | None
    settings: RegistrationSettings
    preset: Preset  # the settings' preset, iterations applied
    windows: tuple[IntensityWindow, IntensityWindow]  # the fixed image's and the moving's
    moving_colour: sitk.Image | None  # a colour moving picture; moving_image is its luminance
    notes: tuple[str, ...]  # what the checks decided, for the report


class _MasksAndLabels(NamedTuple):
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    label_maps: dict[str, sitk.Image]
    fixed_labels: sitk.Image | None


def check_inputs(
    fixed: ImageLike,
    moving: ImageLike,
    settings: RegistrationSettings,
    stages: Stages,
    *,
    fixed_mask: ImageLike | None,
    moving_mask: ImageLike | None,
    moving_labels: Mapping[str, ImageLike] | None,
    fixed_labels: ImageLike | None,
    initial_transform: sitk.Transform | None,
) -> Inputs:
    stages.report("checks", 0.0, "checking inputs")
    fixed_read = _as_image(fixed, "fixed image")
    moving_read = _as_image(moving, "moving image")
    fixed_image, moving_image = luminance(fixed_read), luminance(moving_read)
    check_intensity_image(fixed_image, "the fixed image")
    check_intensity_image(moving_image, "the moving image")
    stages.check("during the input checks")
    check_same_dimension(fixed_image, moving_image)
    dim = fixed_image.GetDimension()
    preset = settings.resolved_preset()
    if initial_transform is not None and not is_linear(initial_transform, dim):
        raise InputError(
            "the initial transform must be linear (rigid/affine); apply a deformable initial "
            "transform to the moving image first"
        )
    extras = _checked_masks_and_labels(
        fixed_image, moving_image, fixed_mask, moving_mask, moving_labels, fixed_labels
    )
    stages.check("during the input checks")
    colour = is_colour(fixed_read) or is_colour(moving_read)
    if colour:
        stages.report("checks", 1.0, LUMINANCE_NOTE)
    stages.report("checks", 1.0, "inputs checked")
    return Inputs(
        fixed_image=fixed_image, moving_image=moving_image,
        **extras._asdict(), initial_transform=initial_transform, settings=settings,
        preset=preset, windows=(IntensityWindow.of(fixed_image), IntensityWindow.of(moving_image)),
        moving_colour=moving_read if is_colour(moving_read) else None,
        notes=(LUMINANCE_NOTE,) if colour else (),
    )  # fmt: skip


def _as_image(image: ImageLike, what: str) -> sitk.Image:
    return image if isinstance(image, sitk.Image) else read_image(image, what)


def _checked_masks_and_labels(
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    fixed_mask: ImageLike | None,
    moving_mask: ImageLike | None,
    moving_labels: Mapping[str, ImageLike] | None,
    fixed_labels: ImageLike | None,
) -> _MasksAndLabels:
    dim = fixed_image.GetDimension()
    fixed_mask_img = (
        None if fixed_mask is None
        else mask_on_grid(_as_image(fixed_mask, "fixed mask"), fixed_image, "the fixed mask")
    )  # fmt: skip
    moving_mask_img = (
        None if moving_mask is None
        else mask_on_grid(_as_image(moving_mask, "moving mask"), moving_image, "the moving mask")
    )  # fmt: skip
    label_maps = {
        name: check_label_map(_as_image(image, f"label map {name!r}"), f"label map {name!r}")
        for name, image in (moving_labels or {}).items()
    }
    for name, labels in label_maps.items():
        if labels.GetDimension() != dim:
            raise InputError(f"label map {name!r} is {labels.GetDimension()}D, images are {dim}D")
    fixed_label_img = (
        None if fixed_labels is None
        else check_label_map(_as_image(fixed_labels, "fixed labels"), "the fixed label map")
    )  # fmt: skip
    return _MasksAndLabels(fixed_mask_img, moving_mask_img, label_maps, fixed_label_img)
