"""A DWI NRRD's gradient table through ``deepregister apply``: every direction turned with the
transform's rotation and read back by Slicer's own NRRD reader (slicer-core) as the directions
it should be, whatever the frame and space of the file it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import oblique_grid

from DeepRegisterLib import apply_transform
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging import diffusion, fileio

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
#: As Slicer writes a DWI: RAS, a measurement frame that is not the identity (a quarter turn).
FRAME_COLUMNS = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T
DIRECTIONS = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0.6, 0.8], [0.48, 0.6, 0.64]])


def write_dwi(path: Path, space: str = "right-anterior-superior", frame: bool = True) -> None:
    """A 10 × 9 × 8 DWI of five directions, header by hand as Slicer's writer lays it out."""
    shape, n = (8, 9, 10), len(DIRECTIONS)
    k, j, i = np.mgrid[: shape[0], : shape[1], : shape[2]]
    data = np.stack([(90 + 7 * i + 5 * j * d + 3 * k) % 400 for d in range(n)], axis=-1)
    columns = " ".join(f"({','.join(f'{v:g}' for v in c)})" for c in FRAME_COLUMNS.T)
    lines = [
        "NRRD0005", "type: short", "dimension: 4", f"space: {space}", f"sizes: {n} 10 9 8",
        "space directions: none (-2,0,0) (0,2,0) (0,0.3,2.5)", "kinds: list domain domain domain",
        "endian: little", "encoding: raw", "space origin: (10,-4,6)",
        *([f"measurement frame: {columns}"] if frame else []),
        "modality:=DWMRI", "DWMRI_b-value:=1000",
        *(f"DWMRI_gradient_{d:04d}:={' '.join(f'{v:g}' for v in g)}"
          for d, g in enumerate(DIRECTIONS)),
    ]  # fmt: skip
    path.write_bytes("\n".join(lines).encode() + b"\n\n" + data.astype("<i2").tobytes())


def slicer_gradients(path: Path) -> tuple[np.ndarray, list[float]]:
    """Each direction in RAS and each b-value, as Slicer's NRRD reader gives them."""
    slicer = pytest.importorskip("mrml_scenes").slicer  # skips without slicer-core
    import vtk

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLDiffusionWeightedVolumeNode()
    storage = slicer.vtkMRMLNRRDStorageNode()
    scene.AddNode(node)
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    matrix = vtk.vtkMatrix4x4()
    node.GetMeasurementFrameMatrix(matrix)
    frame = np.array([[matrix.GetElement(r, c) for c in range(3)] for r in range(3)])
    gradients = node.GetDiffusionGradients()
    table = np.array([gradients.GetTuple3(d) for d in range(gradients.GetNumberOfTuples())])
    return (frame @ table.T).T, [node.GetBValue(d) for d in range(node.GetNumberOfGradients())]


def apply(*argv: object) -> int:
    return cli.main(["apply", *map(str, argv)])


@pytest.fixture
def turned(tmp_path: Path) -> dict:
    """A DWI, a reference grid and a 25° turn with a shift, as files."""
    rotation = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.1, -0.2, np.deg2rad(20.0), (1.0, 2.0, -1))
    paths = {"dwi": tmp_path / "dwi.nrrd", "reference": tmp_path / "reference.nrrd",
             "transform": tmp_path / "turn.tfm"}  # fmt: skip
    write_dwi(paths["dwi"])
    grid = oblique_grid(3, size=(11, 10, 8), spacing=(2.0, 2.0, 2.5), centre=np.zeros(3))
    sitk.WriteImage(grid.reference_image(), str(paths["reference"]))
    sitk.WriteTransform(rotation, str(paths["transform"]))
    return {**paths, "rotation": np.reshape(rotation.GetMatrix(), (3, 3)), "grid": grid}


def test_slicer_reads_the_warped_dwis_directions_turned_with_the_transform(turned, tmp_path):
    """Reference → image turns by R (LPS), so a direction of the image is Rᵀ g on the reference;
    in RAS, S Rᵀ S g. b-values and voxels are those of the warp itself."""
    target = tmp_path / "warped.nrrd"

    code = apply("--transform", turned["transform"], "--reference", turned["reference"],
                 "--image", turned["dwi"], target)  # fmt: skip

    assert code == cli.EXIT_OK
    before, b_before = slicer_gradients(turned["dwi"])
    after, b_after = slicer_gradients(target)
    ras_turn = RAS_TO_LPS @ turned["rotation"].T @ RAS_TO_LPS
    np.testing.assert_allclose(after, (ras_turn @ before.T).T, atol=1e-6)
    np.testing.assert_allclose(b_after, b_before, rtol=1e-6)
    assert np.abs(after - before).max() > 0.3  # the turn is not lost in the tolerance
    source = sitk.ReadImage(str(turned["dwi"]))
    alone = apply_transform(source, sitk.ReadTransform(str(turned["transform"])), turned["grid"])
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(target))), sitk.GetArrayFromImage(alone)
    )


def test_the_rotation_is_the_affines_own_without_its_stretch() -> None:
    """An affine that turns by R and stretches along oblique axes (L = R S): R exactly."""
    turn = sitk.VersorTransform((0.2, -0.5, 1.0), 0.6)
    rotation = np.reshape(turn.GetMatrix(), (3, 3))
    q, _ = np.linalg.qr(np.array([[1.0, 2.0, 0.5], [0.3, -1.0, 2.0], [1.5, 0.2, -0.7]]))
    stretch = q @ np.diag([1.3, 0.8, 1.1]) @ q.T
    affine = sitk.AffineTransform((rotation @ stretch).ravel().tolist(), (4.0, -2.0, 1.0))
    grid = oblique_grid(3, size=(12, 12, 12), spacing=(2.0, 2.0, 2.0))
    np.testing.assert_allclose(diffusion.transform_rotation(affine, grid), rotation, atol=1e-9)


@pytest.mark.parametrize(
    ("output", "space", "reason"),
    [
        ("warped.nii.gz", "right-anterior-superior", "only an NRRD holds one"),
        ("warped.nrrd", "scanner-xyz", "no anatomical frame"),
    ],
)
def test_a_table_that_cannot_be_carried_is_named(turned, tmp_path, capsys, output, space, reason):
    write_dwi(turned["dwi"], space=space)
    target = tmp_path / output

    code = apply("--transform", turned["transform"], "--reference", turned["reference"],
                 "--image", turned["dwi"], target)  # fmt: skip

    assert code == cli.EXIT_OK
    assert reason in capsys.readouterr().out
    warped = sitk.ReadImage(str(target))
    assert not any(key.startswith("DWMRI") for key in warped.GetMetaDataKeys())


def test_a_missing_frame_is_the_files_own_space(tmp_path) -> None:
    """Without a measurement frame the NRRD format puts the directions in the file's space:
    in RAS, an LPS direction is (−x, −y, z)."""
    path = tmp_path / "dwi.nrrd"
    write_dwi(path, frame=False)
    table = diffusion.read_gradient_table(path, sitk.ReadImage(str(path)))
    np.testing.assert_allclose(table.directions, DIRECTIONS @ RAS_TO_LPS)
    assert table.keys == {"modality": "DWMRI", "DWMRI_b-value": "1000"}


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr"])
@pytest.mark.parametrize("compress", [False, True])
def test_header_fields_go_into_attached_and_detached_nrrds(tmp_path, suffix, compress) -> None:
    image = sitk.GetImageFromArray(np.arange(60, dtype=np.int16).reshape(3, 4, 5))
    path = tmp_path / f"fields{suffix}"

    fileio.write_image(image, path, compress, nrrd_fields=diffusion.LPS_FRAME)

    header = path.read_bytes().split(b"\n\n")[0].decode("latin-1")
    assert "\nmeasurement frame: (1,0,0) (0,1,0) (0,0,1)" in header
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(path))), sitk.GetArrayFromImage(image)
    )


# --- FSL's bvec/bval beside a NIfTI series ----------------------------------------------------


def write_nifti_dwi(folder: Path, direction: np.ndarray) -> tuple[Path, np.ndarray]:
    """A 4D NIfTI series with bvec and bval files, as dcm2niix writes them; its directions in
    RAS by the FSL rule (along the voxel axes, the first negated for a positive determinant)."""
    n = len(DIRECTIONS)
    k, j, i = np.mgrid[:8, :9, :10]
    volumes = [sitk.GetImageFromArray(((90 + 7 * i + 5 * j * d + 3 * k) % 400).astype(np.int16))
               for d in range(n)]  # fmt: skip
    series = sitk.JoinSeries(volumes)
    block = np.eye(4)
    block[:3, :3] = direction
    series.SetDirection(block.ravel().tolist())
    series.SetSpacing((2.0, 2.0, 2.5, 1.0))
    series.SetOrigin((-9.0, 8.0, -10.0, 0.0))
    path = folder / "dwi.nii.gz"
    sitk.WriteImage(series, str(path))
    bvecs = DIRECTIONS / np.maximum(np.linalg.norm(DIRECTIONS, axis=1, keepdims=True), 1e-12)
    np.savetxt(folder / "dwi.bvec", bvecs.T, fmt="%.6f")
    (folder / "dwi.bval").write_text(" ".join("0" if d == 0 else "1000" for d in range(n)) + "\n")
    return path, (RAS_TO_LPS @ direction @ _fsl_flip(direction) @ bvecs.T).T


def _fsl_flip(direction: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(direction) > 0 else np.eye(3)


@pytest.mark.parametrize("handedness", ["neurological", "radiological"])
def test_bvecs_beside_a_nifti_series_are_turned_and_written_beside_its_output(
    turned, tmp_path, handedness
):
    """The output's bvec, read by the same rule on the output grid, holds the source's RAS
    directions turned by the transform; the bval is copied."""
    direction = np.reshape(turned["grid"].direction, (3, 3))
    if handedness == "radiological":
        direction = direction @ np.diag([-1.0, 1.0, 1.0])
    source, world = write_nifti_dwi(tmp_path, direction)
    target = tmp_path / "out" / "warped.nii.gz"
    target.parent.mkdir()

    code = apply("--transform", turned["transform"], "--reference", turned["reference"],
                 "--image", source, target)  # fmt: skip

    assert code == cli.EXIT_OK
    out_direction = np.reshape(turned["grid"].direction, (3, 3))
    written = np.loadtxt(tmp_path / "out" / "warped.bvec")
    got = (RAS_TO_LPS @ out_direction @ _fsl_flip(out_direction) @ written).T
    ras_turn = RAS_TO_LPS @ turned["rotation"].T @ RAS_TO_LPS
    np.testing.assert_allclose(got, (ras_turn @ world.T).T, atol=2e-6)
    assert (tmp_path / "out" / "warped.bval").read_text() == (tmp_path / "dwi.bval").read_text()


def test_a_nifti_and_an_nrrd_of_one_dwi_come_out_with_the_same_directions(turned, tmp_path):
    """The bvec path against the NRRD one, which Slicer's reader checks: the same directions
    in the world, given and read back each its own way."""
    source, world = write_nifti_dwi(tmp_path, np.reshape(turned["grid"].direction, (3, 3)))
    nrrd_dir = tmp_path / "nrrd"
    nrrd_dir.mkdir()
    ras_in_frame = np.linalg.solve(FRAME_COLUMNS, world.T).T  # NRRD keys in the quarter frame
    write_dwi(turned["dwi"])
    text = turned["dwi"].read_bytes()
    head, data = text.split(b"\n\n", 1)
    lines = [line for line in head.decode().split("\n") if not line.startswith("DWMRI_gradient")]
    lines += [f"DWMRI_gradient_{d:04d}:={' '.join(f'{v:.9g}' for v in g)}"
              for d, g in enumerate(ras_in_frame)]  # fmt: skip
    turned["dwi"].write_bytes("\n".join(lines).encode() + b"\n\n" + data)
    outputs = {"nifti": tmp_path / "w.nii.gz", "nrrd": nrrd_dir / "w.nrrd"}

    for given, out in ((source, outputs["nifti"]), (turned["dwi"], outputs["nrrd"])):
        code = apply("--transform", turned["transform"], "--reference", turned["reference"],
                     "--image", given, out)  # fmt: skip
        assert code == cli.EXIT_OK

    from_nrrd, _ = slicer_gradients(outputs["nrrd"])
    out_direction = np.reshape(turned["grid"].direction, (3, 3))
    bvec = np.loadtxt(tmp_path / "w.bvec")
    from_bvec = (RAS_TO_LPS @ out_direction @ _fsl_flip(out_direction) @ bvec).T
    np.testing.assert_allclose(from_bvec, from_nrrd, atol=2e-6)


@pytest.mark.parametrize("bvec", ["1 0\n0 1\n0 0\n", "x y z\n"], ids=["two", "not-numbers"])
def test_bvecs_that_do_not_fit_the_series_are_named(turned, tmp_path, capsys, bvec):
    source, _ = write_nifti_dwi(tmp_path, np.eye(3))
    (tmp_path / "dwi.bvec").write_text(bvec)  # five volumes

    code = apply("--transform", turned["transform"], "--reference", turned["reference"],
                 "--image", source, tmp_path / "w.nii.gz")  # fmt: skip

    assert code == cli.EXIT_OK
    assert "does not hold one direction for each of its 5 volumes" in capsys.readouterr().out
    assert not (tmp_path / "w.bvec").exists()
