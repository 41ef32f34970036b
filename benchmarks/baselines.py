"""The classical baselines the benchmark compares DeepRegister with: identity, ANTs (SyN and
antsRegistrationSyN[s]), elastix and SimpleITK demons.

Each takes the pair's images and the run's :class:`~benchmarks.tasks.Settings` and returns an
:class:`~benchmarks.tasks.Output`. Heavy baselines import their package inside the function,
so the benchmark runs (and reports them as skipped) when ``antspyx`` or ``itk-elastix`` is not
installed.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .tasks import Output, Settings

# --- helpers ----------------------------------------------------------------------------------


def _identity(dim: int) -> sitk.Transform:
    return sitk.Transform(dim, sitk.sitkIdentity)


def _warp_labels(
    moving_labels: sitk.Image, fixed_labels: sitk.Image, transform: sitk.Transform
) -> sitk.Image:
    return sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0)


def _displacement(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return to_field.Execute(transform)


def _label_array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label array (float from ANTs / elastix) as an image of the reference's pixel type."""
    image = sitk.GetImageFromArray(np.rint(array).astype(np.int32))
    image.CopyInformation(reference)
    return sitk.Cast(image, reference.GetPixelID())


def _agreement(a: sitk.Image, b: sitk.Image) -> float:
    """Fraction of non-background voxels on which two label maps agree."""
    va, vb = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
    inside = (va != 0) | (vb != 0)
    return float(np.count_nonzero((va == vb) & inside) / max(np.count_nonzero(inside), 1))


# --- methods ----------------------------------------------------------------------------------


def run_identity(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """No registration: the moving labels as they lie in physical space."""
    warped = _warp_labels(moving_labels, fixed_labels, _identity(fixed.GetDimension()))
    return Output(warped)


def _to_ants(image: sitk.Image) -> Any:
    """SimpleITK → ANTsImage (float32); both use ITK's LPS geometry, arrays are transposed."""
    import ants

    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    return ants.from_numpy(
        np.ascontiguousarray(array.transpose()),
        origin=tuple(image.GetOrigin()),
        spacing=tuple(image.GetSpacing()),
        direction=np.asarray(image.GetDirection()).reshape(dim, dim),
    )


def _read_ants_transform(path: str) -> sitk.Transform:
    """One file of ANTs' ``fwdtransforms``: a .mat affine or a displacement-field image."""
    if path.endswith((".nii.gz", ".nii", ".nrrd")):
        field_image = sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(field_image)
    return sitk.ReadTransform(path)


def run_ants(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """``ants.registration(type_of_transform="SyN")`` with antspyx's defaults.

    The defaults are Mattes MI for the affine and the SyN stage, SyN iterations (40, 20, 0) at
    shrink factors 4, 2, 1. ``--cross-contrast`` passes the same metrics explicitly.
    """
    options: dict[str, Any] = {}
    if settings.cross_contrast:
        options.update(aff_metric="mattes", syn_metric="mattes")
    if settings.smoke:
        options.update(reg_iterations=(10, 5, 0))
    return _run_ants("SyN", fixed, moving, moving_labels, fixed_labels, settings, options)


def run_ants_syns(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """``ants.registration(type_of_transform="antsRegistrationSyN[s]")``: the strongest ANTs
    configuration, antsRegistrationSyN.sh's defaults.

    Rigid, affine (MI, 1000×500×250×100 at shrink 8/4/2/1) then SyN with the CC metric (radius
    2, 100×70×50×20 at shrink 8/4/2/1); about 46 minutes a 1 mm brain pair on 2 cores, so it
    runs only when named in ``--methods``. antspyx builds this stage list itself: the metric
    and iterations cannot be changed (CC even for ``--cross-contrast``, full iterations even
    for ``--smoke``), which the notes record.
    """
    output = _run_ants(
        "antsRegistrationSyN[s]", fixed, moving, moving_labels, fixed_labels, settings, {}
    )
    output.notes["metric"] = "CC, radius 2 (antsRegistrationSyN.sh's; antspyx fixes it)"
    return output


def _run_ants(
    type_of_transform: str,
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
    options: dict[str, Any],
) -> Output:
    """One ``ants.registration`` call; the labels are warped by ANTs itself (nearest neighbour).

    det J comes from the forward transforms read into a SimpleITK composite.
    ``fwdtransforms`` is ``[warp, affine]`` and a fixed point goes through the warp first, then
    the affine: ``T(x) = A(W(x))``, which is ``sitk.CompositeTransform([affine, warp])`` (ITK
    applies the last-added transform first). The notes record how many label voxels ANTs' own
    warping and this composite agree on.
    """
    import ants

    if hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
        ants.config._random_seed = settings.seed + 1  # best effort: antspyx has no public seed
    folder = Path(tempfile.mkdtemp(prefix="deepregister-bench-ants-"))
    registration = ants.registration(
        _to_ants(fixed),
        _to_ants(moving),
        type_of_transform=type_of_transform,
        outprefix=str(folder / "syn_"),
        **options,
    )
    transforms = list(registration["fwdtransforms"])
    warped_ants = ants.apply_transforms(
        fixed=_to_ants(fixed_labels),
        moving=_to_ants(moving_labels),
        transformlist=transforms,
        interpolator="nearestNeighbor",
    )
    warped = _label_array_to_image(warped_ants.numpy().transpose(), fixed_labels)
    notes: dict[str, Any] = {
        "type_of_transform": type_of_transform,
        "transforms": [Path(p).name for p in transforms],
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    }

    def displacement() -> sitk.Image:
        try:
            # ITK applies a composite's list last-first: [affine, warp] is A(W(x)).
            composite = sitk.CompositeTransform(
                [_read_ants_transform(p) for p in reversed(transforms)]
            )
            check = _warp_labels(moving_labels, fixed_labels, composite)
            notes["label_agreement_with_composite"] = _agreement(warped, check)
            return _displacement(composite, fixed)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return Output(warped, displacement, notes)


def _to_itk(image: sitk.Image) -> Any:
    import itk

    dim = image.GetDimension()
    converted = itk.image_from_array(
        np.ascontiguousarray(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)))
    )
    converted.SetOrigin(tuple(image.GetOrigin()))
    converted.SetSpacing(tuple(image.GetSpacing()))
    converted.SetDirection(
        itk.matrix_from_array(np.asarray(image.GetDirection()).reshape(dim, dim))
    )
    return converted


def run_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """itk-elastix with its default "affine" then "bspline" parameter maps.

    Changes to the defaults: centre-of-gravity initialisation of the affine stage (the fs-dev
    subjects lie in different native spaces), ``MaximumNumberOfIterations`` when
    ``--elastix-iterations`` is given, no result image written. Both maps already use
    AdvancedMattesMutualInformation (so ``--cross-contrast`` changes nothing). Labels go through
    transformix with ``FinalBSplineInterpolationOrder 0`` (nearest neighbour).
    """
    import itk

    # Not ElastixRegistrationMethod.SetNumberOfThreads: with itk-elastix 0.25.4 it makes the
    # B-spline stage segfault. The global ITK default is honoured and safe.
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(settings.threads)
    parameters = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        parameter_map = parameters.GetDefaultParameterMap(name)
        parameter_map["WriteResultImage"] = ["false"]
        if name == "affine":
            parameter_map["AutomaticTransformInitialization"] = ["true"]
            parameter_map["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        iterations = 30 if settings.smoke else settings.elastix_iterations
        if iterations is not None:
            parameter_map["MaximumNumberOfIterations"] = [str(iterations)]
        if settings.cross_contrast:
            metric = list(parameter_map["Metric"])
            metric[0] = "AdvancedMattesMutualInformation"
            parameter_map["Metric"] = metric
        parameters.AddParameterMap(parameter_map)
    fixed_itk, moving_itk = _to_itk(fixed), _to_itk(moving)
    elastix = itk.ElastixRegistrationMethod.New(fixed_itk, moving_itk)
    elastix.SetParameterObject(parameters)
    elastix.SetLogToConsole(False)
    elastix.UpdateLargestPossibleRegion()
    transform_parameters = elastix.GetTransformParameterObject()
    for index in range(transform_parameters.GetNumberOfParameterMaps()):
        transform_parameters.SetParameter(index, "FinalBSplineInterpolationOrder", "0")
    warped_itk = itk.transformix_filter(_to_itk(moving_labels), transform_parameters)
    warped = _label_array_to_image(itk.array_from_image(warped_itk), fixed_labels)

    def displacement() -> sitk.Image:
        field_itk = itk.transformix_deformation_field(moving_itk, transform_parameters)
        field_array = itk.array_from_image(field_itk).astype(np.float64)
        image = sitk.GetImageFromArray(field_array, isVector=True)
        image.CopyInformation(fixed)
        return image

    notes = {
        "iterations": "default (256)"
        if settings.elastix_iterations is None
        else settings.elastix_iterations,
    }
    return Output(warped, displacement, notes)


def _coarse_reference(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """A grid over the same extent and orientation as ``image`` at ``spacing_mm``."""
    dim = image.GetDimension()
    old_spacing = np.asarray(image.GetSpacing())
    size = np.maximum(np.ceil(np.asarray(image.GetSize()) * old_spacing / spacing_mm), 1)
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    # Keep the grid's outer corner: first voxel centre moves inwards by half the size change.
    shift = direction @ ((spacing_mm - old_spacing) / 2.0)
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing([spacing_mm] * dim)
    reference.SetOrigin(tuple(np.asarray(image.GetOrigin()) + shift))
    reference.SetDirection(image.GetDirection())
    return reference


def run_demons(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """SimpleITK FastSymmetricForcesDemons on 2 mm images after DeepRegister's affine stage.

    Both images are normalised (1st–99th percentile → [0, 1]), smoothed and resampled onto a
    2 mm grid over the fixed image (the moving one through the affine), the moving histogram is
    matched to the fixed one, then demons runs ``--demons-iterations`` steps (Gaussian
    smoothing of the field, σ = 1 voxel). Total transform: ``T(x) = A(x + d(x))``.
    """
    from DeepRegisterLib.registration.affine_search import register_affine
    from DeepRegisterLib.registration.preprocessing import normalised_for_registration

    dim = fixed.GetDimension()
    affine = register_affine(fixed, moving, seed=settings.seed)
    reference = _coarse_reference(fixed, 2.0)

    def coarse(image: sitk.Image, transform: sitk.Transform) -> sitk.Image:
        sigma = [0.4 * math.sqrt(max(4.0 - s * s, 0.0)) for s in image.GetSpacing()]
        smooth = normalised_for_registration(image)
        if max(sigma) > 0:
            smooth = sitk.SmoothingRecursiveGaussian(smooth, sigma)
        return sitk.Resample(smooth, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    fixed_2mm = coarse(fixed, _identity(dim))
    moving_2mm = coarse(moving, affine)
    matched = sitk.HistogramMatching(
        moving_2mm,
        fixed_2mm,
        numberOfHistogramLevels=256,
        numberOfMatchPoints=15,
        thresholdAtMeanIntensity=True,
    )
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(5 if settings.smoke else settings.demons_iterations)
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(1.0)
    demons.SetNumberOfThreads(settings.threads)
    field_2mm = demons.Execute(fixed_2mm, matched)
    composite = sitk.CompositeTransform(
        [affine, sitk.DisplacementFieldTransform(sitk.Cast(field_2mm, sitk.sitkVectorFloat64))]
    )
    warped = _warp_labels(moving_labels, fixed_labels, composite)
    notes = {
        "iterations": demons.GetElapsedIterations(),
        "rms_change": demons.GetRMSChange(),
        "grid": list(reference.GetSize()),
    }
    return Output(warped, lambda: _displacement(composite, fixed), notes)
