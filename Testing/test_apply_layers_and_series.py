"""``deepregister apply`` beyond one grey-level image on its reference's grid: a 4D series
volume by volume, a series as the reference (a DWI's gradient table: test_diffusion_gradients),
``--spacing``, a colour picture channel by channel, outputs too large for the memory refused
before any warping, and multi-layer Slicer segmentations (from ``apply`` and ``register``) read
back by Slicer's own storage node with their segments."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import image_on, oblique_grid

from DeepRegisterLib import apply_transform
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair


def apply(*argv: object) -> int:
    return cli.main(["apply", *map(str, argv)])


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def rigid_3d(tmp_path: Path) -> Path:
    """A small rotation and shift, as a transform file."""
    transform = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.04, -0.03, 0.05, (0.8, -1.1, 0.6))
    path = tmp_path / "rigid.tfm"
    sitk.WriteTransform(transform, str(path))
    return path


def test_a_4d_series_is_warped_volume_by_volume(tmp_path):
    """Each volume of a 16-bit series comes out as that volume alone would, on the reference
    grid; the series keeps its type and its fourth axis (spacing: the repetition time)."""
    grid = oblique_grid(3, size=(14, 12, 10), spacing=(2.0, 2.5, 3.0))
    k, j, i = np.mgrid[:10, :12, :14]
    volumes = [(40 * i + 25 * j + 10 * k) * (t + 1) % 3000 for t in range(5)]
    series = sitk.GetImageFromArray(np.stack(volumes).astype(np.int16), isVector=False)
    block = np.reshape(grid.direction, (3, 3))
    direction = np.eye(4)
    direction[:3, :3] = block
    series.SetSpacing((*grid.spacing, 2.5))
    series.SetOrigin((*grid.origin, 7.0))
    series.SetDirection(direction.ravel().tolist())
    paths = {name: tmp_path / f"{name}.nii.gz" for name in ("series", "reference", "warped")}
    sitk.WriteImage(series, str(paths["series"]))
    reference = oblique_grid(3, size=(16, 13, 9), spacing=(1.8, 2.2, 2.7), degrees=25.0)
    sitk.WriteImage(reference.reference_image(), str(paths["reference"]))
    transform = rigid_3d(tmp_path)

    code = apply("--transform", transform, "--reference", paths["reference"],
                 "--image", paths["series"], paths["warped"])  # fmt: skip

    assert code == cli.EXIT_OK
    warped = sitk.ReadImage(str(paths["warped"]))
    assert warped.GetSize() == (*reference.size, 5)
    assert warped.GetSpacing()[3] == 2.5  # the repetition time
    assert warped.GetOrigin()[3] == 7.0
    np.testing.assert_allclose(warped.GetOrigin()[:3], reference.origin, atol=1e-4)
    out = sitk.GetArrayFromImage(warped)
    assert out.dtype == np.int16
    read_transform = sitk.ReadTransform(str(transform))
    for t, volume in enumerate(volumes):
        alone = apply_transform(image_on(grid, volume.astype(np.int16)), read_transform, reference)
        np.testing.assert_array_equal(out[t], sitk.GetArrayFromImage(alone))
    assert out[0].any()
    assert not np.array_equal(out[0], out[1])


def test_a_series_as_the_reference_gives_the_grid_of_its_volumes(tmp_path):
    """Labels into an fMRI run's space (``--inverse-transform``, the run as the reference): the
    output is 3D, on the grid of the run's volumes."""
    grid = oblique_grid(3, size=(14, 12, 10), spacing=(2.0, 2.5, 3.0))
    run = sitk.JoinSeries([grid.reference_image(sitk.sitkInt16)] * 3)
    direction = np.eye(4)
    direction[:3, :3] = np.reshape(grid.direction, (3, 3))
    run.SetOrigin((*grid.origin, 0.0))
    run.SetSpacing((*grid.spacing, 2.0))
    run.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(run, str(tmp_path / "run.nii.gz"))
    k, j, i = np.mgrid[:10, :12, :14]
    labels = image_on(grid, ((i // 4) + 3 * (j // 4) + 9 * (k // 4) + 1).astype(np.uint8))
    sitk.WriteImage(labels, str(tmp_path / "labels.nii.gz"))

    code = apply("--transform", rigid_3d(tmp_path), "--reference", tmp_path / "run.nii.gz",
                 "--labels", tmp_path / "labels.nii.gz", tmp_path / "out.nii.gz")  # fmt: skip

    assert code == cli.EXIT_OK
    out = sitk.ReadImage(str(tmp_path / "out.nii.gz"))
    assert out.GetSize() == grid.size
    np.testing.assert_allclose(out.GetOrigin(), grid.origin, atol=1e-4)
    alone = apply_transform(labels, sitk.ReadTransform(str(tmp_path / "rigid.tfm")), grid, True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(alone))


def test_spacing_keeps_the_references_field_of_view_on_a_coarser_grid(tmp_path, capsys):
    """``--spacing 3`` with a 1 mm reference: the output covers the reference's field of view,
    centred alike, in its orientation, at 3 mm (27 times fewer voxels for a series)."""
    reference = oblique_grid(3, size=(30, 27, 24), spacing=(1.0, 1.0, 1.0))
    sitk.WriteImage(reference.reference_image(), str(tmp_path / "reference.nrrd"))
    image = image_on(oblique_grid(3, size=(12, 11, 10), spacing=(3.0, 3.0, 3.0)),
                     np.arange(1320, dtype=np.int16).reshape(10, 11, 12))  # fmt: skip
    sitk.WriteImage(image, str(tmp_path / "image.nrrd"))
    argv = ("--transform", rigid_3d(tmp_path), "--reference", tmp_path / "reference.nrrd",
            "--image", tmp_path / "image.nrrd", tmp_path / "out.nrrd")  # fmt: skip

    assert apply(*argv, "--spacing", "3") == cli.EXIT_OK

    out = sitk.ReadImage(str(tmp_path / "out.nrrd"))
    assert out.GetSize() == (10, 9, 8)
    assert out.GetSpacing() == pytest.approx((3.0, 3.0, 3.0), abs=1e-12)  # NRRD rounding
    np.testing.assert_allclose(out.GetDirection(), reference.direction, atol=1e-12)

    def centre(grid: sitk.Image) -> np.ndarray:
        middle = [(size - 1) / 2 for size in grid.GetSize()]
        return np.asarray(grid.TransformContinuousIndexToPhysicalPoint(middle))

    np.testing.assert_allclose(centre(out), centre(reference.reference_image()), atol=1e-6)
    alone = apply_transform(image, sitk.ReadTransform(str(tmp_path / "rigid.tfm")), out)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), sitk.GetArrayFromImage(alone))
    assert apply(*argv[:-1], tmp_path / "zero.nrrd", "--spacing", "0") == cli.EXIT_INPUT
    assert "--spacing must be a positive number of mm, not 0.0" in capsys.readouterr().err
    assert not (tmp_path / "zero.nrrd").exists()


def test_a_colour_picture_is_warped_channel_by_channel(tmp_path):
    """An RGB photograph through a transform found on its grey version comes back an 8-bit RGB
    PNG whose every channel is that channel warped alone."""
    y, x = np.mgrid[:40, :48]
    channels = [
        (3 * x + 2 * y) % 256,
        (5 * y) % 256,
        np.where((x - 24) ** 2 + (y - 20) ** 2 < 150, 230, 15),
    ]
    rgb = sitk.GetImageFromArray(np.stack(channels, axis=-1).astype(np.uint8), isVector=True)
    paths = {name: tmp_path / f"{name}.png" for name in ("photo", "grey", "warped")}
    sitk.WriteImage(rgb, str(paths["photo"]))
    sitk.WriteImage(sitk.Cast(sitk.VectorIndexSelectionCast(rgb, 1), sitk.sitkUInt8),
                    str(paths["grey"]))  # fmt: skip
    transform = sitk.Euler2DTransform((24.0, 20.0), 0.08, (1.5, -2.25))
    sitk.WriteTransform(transform, str(tmp_path / "t.tfm"))

    code = apply("--transform", tmp_path / "t.tfm", "--reference", paths["grey"],
                 "--image", paths["photo"], paths["warped"])  # fmt: skip

    assert code == cli.EXIT_OK
    warped = sitk.ReadImage(str(paths["warped"]))
    assert warped.GetNumberOfComponentsPerPixel() == 3
    assert warped.GetPixelID() == sitk.sitkVectorUInt8
    out = sitk.GetArrayFromImage(warped)
    grey = sitk.ReadImage(str(paths["grey"]))
    for c, channel in enumerate(channels):
        alone = apply_transform(sitk.GetImageFromArray(channel.astype(np.uint8)), transform, grey)
        np.testing.assert_array_equal(out[..., c], sitk.GetArrayFromImage(alone))
    assert len({out[..., c].tobytes() for c in range(3)}) == 3


def test_outputs_larger_than_the_memory_are_refused_before_warping(tmp_path, capsys):
    """A reference of 1.5·10¹¹ voxels (a header; its data are never read): the warped image
    would not fit, so the command stops with the memory exit code and writes nothing."""
    header = tmp_path / "huge.mhd"
    header.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 6000 5000 5000\nElementSpacing = 1 1 1\n"
        "Offset = 0 0 0\nTransformMatrix = 1 0 0 0 1 0 0 0 1\nElementType = MET_UCHAR\n"
        "ElementDataFile = huge.raw\n"
    )
    small = tmp_path / "small.nrrd"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt8) + 1, str(small))
    transform = rigid_3d(tmp_path)
    before = sorted(tmp_path.iterdir())

    code = apply("--transform", transform, "--reference", header,
                 "--labels", small, tmp_path / "out.nrrd")  # fmt: skip

    assert code == cli.EXIT_MEMORY
    message = capsys.readouterr()
    assert "warping an image would take 150.0 GB (the image, its warped copy" in message.err
    assert "warping" not in message.out
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize(
    ("size", "pixel_id", "components", "labels", "itk", "engine"),
    [
        # a result of N values; the engine also copies the box (≤ the image) and a scan's as
        # float32, and works on a slab (here the whole grid, 32 bytes a voxel); ITK holds an
        # integer scan's float32 warp before rounding it
        ((10, 10, 10), sitk.sitkInt16, 1, False, 2 + 4, 2 + 2 + 4 + 32),
        ((10, 10, 10), sitk.sitkUInt8, 1, True, 1, 1 + 1 + 32),
        ((10, 10, 10), sitk.sitkFloat64, 1, False, 4, 4 + 8 + 4 + 32),
        ((20, 20, 20), sitk.sitkInt16, 1, False, 2 + 4, 2 + 8 * (2 + 4) + 32),  # 8 N voxels
        # ITK alone: pieces joined into a copy of their result
        ((10, 10, 10), sitk.sitkVectorUInt8, 3, False, 2 * 3 * 1 + 4, None),
        # a series through a float64 field (3 × 8 bytes a voxel) and a float32 cast volume
        ((10, 10, 10, 30), sitk.sitkInt16, 1, False, 2 * 30 * 2 + 4 + 24 + 4, None),
    ],
)
def test_the_memory_a_warp_needs_is_counted_for_either_warp(
    size, pixel_id, components, labels, itk, engine
):
    """What ``apply`` and a batch's plan count to warp an image onto N voxels: ITK's need,
    or the engine's where it is larger and may take the image (one component, the grid's
    dimension), per voxel of the grid as measured on a CT (benchmarks/warp_memory.py)."""
    from DeepRegisterLib.imaging.apply_transform import warped_bytes
    from DeepRegisterLib.imaging.geometry import ImageHeader
    from DeepRegisterLib.registration.saved_transforms import warp_bytes

    grid = oblique_grid(3, size=(10, 10, 10), spacing=(1.0, 1.0, 1.0))
    header = ImageHeader(len(size), size, (1.0,) * len(size), components, pixel_id)
    voxels = 1000
    assert warped_bytes(header, grid, labels) == itk * voxels
    assert warp_bytes(header, grid, labels) == max(itk, engine or 0) * voxels


# --- a Slicer segmentation ---------------------------------------------------------------------


def _saved_segmentation(tmp_path: Path):
    """Three segments on an oblique volume, two overlapping (two layers), written by Slicer's
    storage node; the scene, the volume node and the masks."""
    mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core
    from mrml_scenes import OBLIQUE, _add_segmentation, _add_volume

    scene = mrml_scenes._new_scene(tmp_path / "cache").scene
    shape = (9, 10, 12)
    masks = {name: np.zeros(shape, np.uint8) for name in ("liver", "tumour", "vessel")}
    masks["liver"][1:6, 2:7, 2:9] = 1
    masks["tumour"][3:8, 4:9, 5:11] = 1  # overlaps the liver
    masks["vessel"][6:9, 0:3, 0:4] = 1
    volume = _add_volume(scene, np.zeros(shape, np.float32), (5, 6, 7), OBLIQUE, (1, 1.5, 2))
    colours = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.2, 0.3, 1.0)]
    node = _add_segmentation(scene, volume, masks, colours)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(tmp_path / "segments.seg.nrrd"))
    assert storage.WriteData(node)
    return scene, node


def _read_back(scene, path: Path):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    return node.GetSegmentation()


def test_a_slicer_segmentation_keeps_its_segments(tmp_path):
    """Slicer reads the warped ``.seg.nrrd`` back with every segment's id, name, colour and
    layer; each segment's voxels are its layer warped by nearest neighbour, on the reference
    grid where Slicer places them."""
    scene, node = _saved_segmentation(tmp_path)
    source = tmp_path / "segments.seg.nrrd"
    middle = sitk.ReadImage(str(source)).TransformContinuousIndexToPhysicalPoint((6.0, 5.0, 4.5))
    reference = oblique_grid(
        3, size=(15, 13, 10), spacing=(0.9, 1.3, 1.8), degrees=15.0, centre=np.asarray(middle)
    )
    sitk.WriteImage(reference.reference_image(), str(tmp_path / "reference.nrrd"))
    warped_path, transform = tmp_path / "warped.seg.nrrd", rigid_3d(tmp_path)

    code = apply("--transform", transform, "--reference", tmp_path / "reference.nrrd",
                 "--labels", source, warped_path)  # fmt: skip

    assert code == cli.EXIT_OK
    before, after = node.GetSegmentation(), _read_back(scene, warped_path)
    assert after.GetSegmentIDs() == before.GetSegmentIDs()
    assert after.GetNumberOfLayers() == before.GetNumberOfLayers() == 2
    layers = array(warped_path)  # (K, J, I, layer)
    expected = apply_transform(
        sitk.ReadImage(str(source)), sitk.ReadTransform(str(transform)), reference, labels=True
    )
    np.testing.assert_array_equal(layers, sitk.GetArrayFromImage(expected))
    ras = np.diag([-1.0, -1.0, 1.0])
    voxel_to_ras = np.eye(4)
    voxel_to_ras[:3, :3] = (
        ras @ np.reshape(reference.direction, (3, 3)) @ np.diag(reference.spacing)
    )
    voxel_to_ras[:3, 3] = ras @ np.asarray(reference.origin)
    for segment_id in before.GetSegmentIDs():
        old, new = before.GetSegment(segment_id), after.GetSegment(segment_id)
        assert (new.GetName(), new.GetColor()) == (old.GetName(), old.GetColor())
        layer = after.GetLayerIndex(segment_id)
        assert layer == before.GetLayerIndex(segment_id)
        mask = layers[..., layer] == new.GetLabelValue()
        assert mask.any(), f"{new.GetName()} vanished"
        labelmap = new.GetRepresentation("Binary labelmap")
        assert np.count_nonzero(_voxels(labelmap) == new.GetLabelValue()) == mask.sum()
        np.testing.assert_allclose(_image_to_world(labelmap), voxel_to_ras, atol=1e-5)
    # Surfaces drawn later are turned into voxels on the new grid, not the old one.
    import slicer

    geometry = slicer.vtkOrientedImageData()
    serialised = after.GetConversionParameter("Reference image geometry")
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(serialised, geometry, False)
    np.testing.assert_allclose(_image_to_world(geometry), voxel_to_ras, atol=1e-9)
    assert geometry.GetDimensions() == reference.size


def _voxels(labelmap) -> np.ndarray:
    from vtk.util.numpy_support import vtk_to_numpy

    return vtk_to_numpy(labelmap.GetPointData().GetScalars())


def _image_to_world(labelmap) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_register_keeps_a_slicer_segmentations_segments_too(tmp_path):
    """``register --labels in.seg.nrrd --warped-labels out.seg.nrrd``: Slicer opens the warped
    labels with the segments' names and colours, each segment holding its label's voxels."""
    mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core
    pair = phantom_pair(demo_grid(3, 24), amplitude_mm=2.0)
    labels = sitk.Cast(pair.moving_labels, sitk.sitkUInt8)
    values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(labels)) if v]
    for index, value in enumerate(values):  # the header Slicer writes for one layer
        for key, text in (("ID", f"S_{value}"), ("Name", f"structure {value}"),
                          ("Color", f"0.{index + 1} 0.5 0.5"), ("LabelValue", str(value)),
                          ("Layer", "0"), ("Extent", "0 23 0 23 0 23")):  # fmt: skip
            labels.SetMetaData(f"Segment{index}_{key}", text)
    labels.SetMetaData("Segmentation_MasterRepresentation", "Binary labelmap")
    labels.SetMetaData("Segmentation_ContainedRepresentationNames", "Binary labelmap|")
    labels.SetMetaData("Segmentation_ReferenceImageExtentOffset", "0 0 0")
    paths = {name: tmp_path / f"{name}.nrrd" for name in ("fixed", "moving")}
    for name, path in paths.items():
        sitk.WriteImage(getattr(pair, name), str(path))
    sitk.WriteImage(labels, str(tmp_path / "labels.seg.nrrd"))
    warped_path = tmp_path / "warped.seg.nrrd"

    code = cli.main([
        "register", "--fixed", str(paths["fixed"]), "--moving", str(paths["moving"]),
        "--labels", str(tmp_path / "labels.seg.nrrd"), "--warped-labels", str(warped_path),
        "--preset", "fast", "--iterations", "4", "--device", "cpu", "--quiet",
    ])  # fmt: skip

    assert code == cli.EXIT_OK
    scene = mrml_scenes._new_scene(tmp_path / "cache").scene
    segmentation = _read_back(scene, warped_path)
    warped = array(warped_path)
    assert segmentation.GetNumberOfSegments() == len(values)
    for index, value in enumerate(values):
        segment = segmentation.GetSegment(f"S_{value}")
        assert segment.GetName() == f"structure {value}"
        assert segment.GetColor() == pytest.approx((0.1 * (index + 1), 0.5, 0.5))
        labelmap = segment.GetRepresentation("Binary labelmap")
        assert np.count_nonzero(_voxels(labelmap) == value) == np.count_nonzero(warped == value)
        assert np.any(warped == value)
