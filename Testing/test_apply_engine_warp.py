"""``deepregister apply`` through the engine's own warp: a large image (here, any image) comes
out as ``register`` warped it, to the bit; what the engine cannot take goes to ITK; which
transforms have the engine's form; the field the engine keeps, counted as made."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_grid
from registered_phantom import apply, array

from DeepRegisterLib import apply_transform
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging import fileio as cli_fileio
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.registration import saved_transforms


@pytest.fixture
def engine_at_any_size(monkeypatch):
    """The engine takes images of every size here: a CT's 157 million voxels make a slow test."""
    monkeypatch.setattr(saved_transforms, "ENGINE_MIN_VOXELS", 1)


def one_layer_segmentation(labels: sitk.Image) -> sitk.Image:
    """``labels`` with the header Slicer writes for a one-layer ``.seg.nrrd``."""
    segmentation = sitk.Cast(labels, sitk.sitkUInt8)
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(segmentation)) if v]
    for index, value in enumerate(values):
        for key, text in (("ID", f"S_{value}"), ("Name", f"structure {value}"),
                          ("LabelValue", str(value)), ("Layer", "0")):  # fmt: skip
            segmentation.SetMetaData(f"Segment{index}_{key}", text)
    segmentation.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    return segmentation


def test_a_large_image_goes_through_the_engine_to_registers_own_bits(
    registered, tmp_path, engine_at_any_size, monkeypatch
):
    """Through register's ``.h5`` the engine's warp writes register's own warped scan, to the
    bit (ITK's float64 rounds a few voxels otherwise: the first test), and here its labels too
    (warped alone, without the scan, a nearest-neighbour tie may round the other way); a Slicer
    segmentation keeps its segments. ITK resamples none of them."""
    monkeypatch.setattr(saved_transforms, "apply_transform", lambda *_: pytest.fail("ITK"))
    segmentation = tmp_path / "labels.seg.nrrd"
    sitk.WriteImage(one_layer_segmentation(sitk.ReadImage(str(registered["labels"]))),
                    str(segmentation))  # fmt: skip
    outputs = {name: tmp_path / name for name in ("scan.nii.gz", "labels.nrrd", "w.seg.nrrd")}
    code = apply(
        "--transform", registered["transform.h5"], "--reference", registered["fixed"],
        "--image", registered["moving"], outputs["scan.nii.gz"],
        "--labels", registered["labels"], outputs["labels.nrrd"],
        "--labels", segmentation, outputs["w.seg.nrrd"],
    )  # fmt: skip
    assert code == cli.EXIT_OK
    scan, labels = array(outputs["scan.nii.gz"]), array(outputs["labels.nrrd"])
    assert scan.dtype == np.uint16
    np.testing.assert_array_equal(scan, array(registered["warped"]))
    np.testing.assert_array_equal(labels, array(registered["warped_labels"]))
    warped_segmentation = sitk.ReadImage(str(outputs["w.seg.nrrd"]))
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(warped_segmentation), labels)
    assert warped_segmentation.GetMetaData("Segment0_Name").startswith("structure ")


def test_a_large_picture_goes_through_the_engine_as_register_warped_it(
    tmp_path, engine_at_any_size, monkeypatch
):
    """In 2D too: an 8-bit picture and its labels through register's ``.h5`` come out as
    register wrote them, as pictures."""
    monkeypatch.setattr(saved_transforms, "apply_transform", lambda *_: pytest.fail("ITK"))
    pair = phantom_pair(demo_grid(2, 32), amplitude_mm=2.0)
    paths = {name: tmp_path / f"{name}.png" for name in ("fixed", "moving", "labels")}
    for name, image in (("fixed", pair.fixed), ("moving", pair.moving)):  # 0 to about 190
        picture = sitk.Cast(sitk.Round(sitk.Clamp(image, lowerBound=0.0)), sitk.sitkUInt8)
        sitk.WriteImage(picture, str(paths[name]))
    sitk.WriteImage(sitk.Cast(pair.moving_labels, sitk.sitkUInt8), str(paths["labels"]))
    code = cli.main([
        "register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
        "--labels", str(paths["labels"]), "--preset", "fast", "--iterations", "4",
        "--device", "cpu", "--quiet", "--transform", str(tmp_path / "t.h5"),
        "--warped", str(tmp_path / "rw.png"), "--warped-labels", str(tmp_path / "rl.png"),
    ])  # fmt: skip
    assert code == cli.EXIT_OK
    code = apply(
        "--transform", tmp_path / "t.h5", "--reference", paths["fixed"],
        "--image", paths["moving"], tmp_path / "w.png", "--labels", paths["labels"],
        tmp_path / "l.png",
    )  # fmt: skip
    assert code == cli.EXIT_OK
    for ours, theirs in (("w.png", "rw.png"), ("l.png", "rl.png")):
        np.testing.assert_array_equal(array(tmp_path / ours), array(tmp_path / theirs))
    assert array(tmp_path / "w.png").max() > 0


def test_what_the_engine_cannot_take_itk_resamples(registered, tmp_path, engine_at_any_size):
    """The dense field (it holds the affine, so it is not zero on its faces), a series and a
    picture on a bright background go to ITK, whatever their size, as before; and everything
    where torch is not installed."""
    grid = Grid.of(sitk.ReadImage(str(registered["fixed"])))
    dense = cli_fileio.read_transform(registered["transform.mha"])
    assert saved_transforms.engine_form(dense, grid) is None
    h5 = cli_fileio.read_transform(registered["transform.h5"])
    warp = saved_transforms.SavedTransformWarp(h5, grid)
    assert warp.may_use_engine
    with pytest.MonkeyPatch.context() as without_torch:  # a Python without torch: ITK
        without_torch.setattr(saved_transforms.importlib.util, "find_spec", lambda _: None)
        assert not saved_transforms.SavedTransformWarp(h5, grid).may_use_engine
    scan = sitk.ReadImage(str(registered["moving"]))
    bright = sitk.Cast(1000 - scan, sitk.sitkUInt16)  # a white background around a dark body
    series = sitk.JoinSeries([scan, scan])
    assert not warp.engine_takes(bright, labels=False)
    assert not warp.engine_takes(series, labels=False)
    assert warp.engine_takes(scan, labels=False)
    assert warp.engine_takes(bright, labels=True)
    itk = apply_transform(bright, warp.transform, grid)
    ours = warp(bright, False)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(itk))


def field_transform(values: np.ndarray, grid: Grid) -> sitk.DisplacementFieldTransform:
    field = grid.apply_to(sitk.GetImageFromArray(values, isVector=True))
    return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))


def test_the_engines_form_is_recognised_and_nothing_else():
    """``[linear, field]`` (ITK applies the field first) or a field alone, on axes the
    reference shares, zero on its faces: the engine's form. The other order, a field that is
    not zero on a face or is turned against the reference, and a B-spline are not."""
    reference = Grid((20, 18, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    coarse = Grid((8, 7, 6), (3.0, 3.0, 3.0), (-2.0, -1.0, 0.5), tuple(np.eye(3).ravel()))
    values = np.zeros((6, 7, 8, 3))
    values[2:4, 2:5, 3:6] = (0.4, -0.7, 1.1)
    rigid = sitk.Euler3DTransform((9.0, 8.0, 7.0), 0.05, -0.02, 0.03, (1.0, -2.0, 0.5))
    field = field_transform(values, coarse)
    form = saved_transforms.engine_form(sitk.CompositeTransform([rigid, field]), reference)
    assert form is not None
    point = (9.5, 8.2, 7.9)
    total = sitk.CompositeTransform([rigid, field]).TransformPoint(point)
    assert np.allclose(form.affine.TransformPoint(field.TransformPoint(point)), total)
    assert saved_transforms.engine_form(field_transform(values, coarse), reference) is not None
    edge = values.copy()
    edge[0, 3, 3] = (0.1, 0.0, 0.0)
    turned = Grid(coarse.size, coarse.spacing, coarse.origin, oblique_grid(3).direction)
    refused = {
        "the other order": sitk.CompositeTransform([field_transform(values, coarse), rigid]),
        "a face not zero": sitk.CompositeTransform([rigid, field_transform(edge, coarse)]),
        "turned axes": sitk.CompositeTransform([rigid, field_transform(values, turned)]),
        "a B-spline": sitk.BSplineTransformInitializer(reference.reference_image(), (3, 3, 3)),
        "an affine alone": rigid,
    }
    for what, transform in refused.items():
        assert saved_transforms.engine_form(transform, reference) is None, what


def test_the_field_the_engine_keeps_is_counted_as_made(monkeypatch):
    """``field_bytes``, which ``apply``'s memory check adds once for all its images, is what
    the engine's warp holds of the field: its slices interpolated onto the reference's fast
    axes, made once up to SHARED_SLICES_BYTES, and nothing kept whole beyond it or for ITK."""
    reference = Grid((20, 18, 16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    coarse = Grid((8, 7, 6), (3.0, 3.0, 3.0), (-2.0, -1.0, 0.5), tuple(np.eye(3).ravel()))
    values = np.zeros((6, 7, 8, 3))
    values[2:4, 2:5, 3:6] = (0.4, -0.7, 1.1)
    rigid = sitk.Euler3DTransform((9.0, 8.0, 7.0), 0.05, -0.02, 0.03, (1.0, -2.0, 0.5))
    transform = sitk.CompositeTransform([rigid, field_transform(values, coarse)])
    image = reference.apply_to(sitk.GetImageFromArray(np.ones((16, 18, 20), np.float32)))

    warp = saved_transforms.SavedTransformWarp(transform, reference, min_voxels=0)
    warp(image, False)
    made = warp._engine._field._v._shared  # the engine's own slices, built by the warp
    assert warp.field_bytes == sum(piece.numel() * piece.element_size() for piece in made)
    assert warp.field_bytes == 6 * 3 * 20 * 18 * 4  # K slices × components × I × J, float32
    monkeypatch.setattr(saved_transforms, "SHARED_SLICES_BYTES", warp.field_bytes - 1)
    assert saved_transforms.SavedTransformWarp(transform, reference, 0).field_bytes == 0
    assert saved_transforms.SavedTransformWarp(rigid, reference, 0).field_bytes == 0  # ITK
