"""Whole-volume steps that run for seconds on a 512² × 600 CT are done in pieces a cancel request
can interrupt, and the pieces give exactly the whole-volume result."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from pieces import CancelOnCall, an_image

from DeepRegisterLib.errors import RegistrationCancelled
from DeepRegisterLib.imaging import metrics, resampling, volumes
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.registration import affine, affine_search, warping
from DeepRegisterLib.registration.optimisation import optimise_velocity
from DeepRegisterLib.registration.presets import Level


def test_resampling_matches_sitk_and_is_aborted_inside_itk() -> None:
    image = an_image((60, 64, 64), (1.0, 1.0, 1.0))
    reference = sitk.Image([70, 60, 50], sitk.sitkUInt8)
    reference.SetSpacing((0.9, 1.1, 1.2))
    transform = sitk.Euler3DTransform((30.0, 30.0, 30.0), 0.1, -0.05, 0.2, (1.0, -2.0, 0.5))
    ours = resampling.resample_linear(image, reference, transform)
    expected = sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(expected)
    )
    count = CancelOnCall(None)
    resampling.resample_linear(image, reference, transform, count)
    assert count.calls > 5, "ITK reported too little progress to abort in time"
    # Answering "cancel" on the third question: ITK is mid-filter then, and must abort.
    with pytest.raises(RegistrationCancelled, match="preparing the images"):
        resampling.resample_linear(image, reference, transform, CancelOnCall(3))


def test_a_filter_that_fails_for_another_reason_raises_its_own_error() -> None:
    image = an_image((8, 8, 8), (1.0, 1.0, 1.0))
    gaussian = sitk.RecursiveGaussianImageFilter()
    gaussian.SetDirection(5)  # no such axis in 3D
    with pytest.raises(RuntimeError):
        resampling.run_filter(gaussian, image, is_cancelled=CancelOnCall(None))


def network_and_fixed_grids() -> tuple[Grid, Grid, torch.Tensor]:
    fixed = Grid.of(an_image((26, 23, 21), (0.9, 1.1, 1.3)))
    network = fixed.with_spacing_cropped_to(2.0, np.array([2, 1, 3]), np.array([18, 20, 22]), 2)
    generator = torch.Generator().manual_seed(0)
    flow = torch.randn((1, 3, *network.shape), generator=generator)
    return network, fixed, flow


def test_the_displacement_built_in_chunks_matches_one_piece(monkeypatch) -> None:
    network, fixed, flow = network_and_fixed_grids()
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.02, 0.01, 0.0, -0.02, 0.98, 0.03, 0.0, 0.01, 1.01))
    affine.SetTranslation((1.5, -0.5, 2.0))
    whole = warping.Displacement(affine, flow, network, fixed).image()
    inverse_whole = warping.inverse_displacement(affine, -flow, network, fixed)
    monkeypatch.setattr(volumes, "SLAB_VOXELS", 2 * 23 * 21)  # two rows per chunk
    count = CancelOnCall(None)
    chunked = warping.Displacement(affine, flow, network, fixed, count).image()
    assert count.calls >= 10
    inverse_chunked = warping.inverse_displacement(affine, -flow, network, fixed)
    for a, b in ((whole, chunked), (inverse_whole, inverse_chunked)):
        assert a.GetPixelID() == b.GetPixelID() == sitk.sitkVectorFloat32
        assert Grid.of(b) == fixed
        # float32 BLAS may round a product differently for another matrix size: 1e-6 mm.
        np.testing.assert_allclose(
            sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b), rtol=0, atol=1e-5
        )
    # What warping and det J read when no one keeps the field holds the same values, in any
    # block (a slab with a box across, a halo row, one voxel).
    u = sitk.GetArrayViewFromImage(whole)
    lazy = warping.Displacement(affine, flow, network, fixed)
    assert lazy.shape == u.shape
    for block in (
        warping.row_block(fixed, 0, fixed.shape[0]),
        (slice(3, 11), slice(2, 19), slice(5, 6)),
        (slice(25, 26), slice(20, 21), slice(0, 21)),
    ):
        np.testing.assert_array_equal(lazy.tensor(block).numpy(), u[block])
    # Outside the network grid the field is the affine's alone: u(x) = A x − x.
    corner = np.asarray(affine.TransformPoint(fixed.origin)) - np.asarray(fixed.origin)
    np.testing.assert_allclose(u[0, 0, 0], corner, atol=1e-4)
    cancel = CancelOnCall(4)
    with pytest.raises(RegistrationCancelled):
        warping.Displacement(affine, flow, network, fixed, cancel).image()
    assert cancel.calls == 4


def test_the_jacobian_stops_between_slabs(monkeypatch) -> None:
    network, fixed, flow = network_and_fixed_grids()
    field = warping.Displacement(sitk.AffineTransform(3), flow, network, fixed).image()
    whole = metrics.jacobian_determinant(field)
    monkeypatch.setattr(metrics, "_JACOBIAN_BLOCK_VOXELS", 23 * 21)
    count = CancelOnCall(None)
    sliced = metrics.jacobian_determinant(field, count)
    assert count.calls >= 26  # one per slice of the fixed grid (and while allocating)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(whole), sitk.GetArrayViewFromImage(sliced)
    )
    with pytest.raises(RegistrationCancelled, match="det J"):
        metrics.jacobian_determinant(field, CancelOnCall(10))


def test_an_optimisation_step_is_asked_five_times_and_stops_inside_backward() -> None:
    """Before the step, after integrating, after the forward pass, and twice during backward
    (after the similarity's gradient, after the warp's): a CT-sized step takes seconds. The
    level's last step is only evaluated (asked twice): no step follows to use its gradient."""
    generator = torch.Generator().manual_seed(0)
    fixed, moving = torch.rand((2, 1, 1, 16, 18, 20), generator=generator)
    levels = [((16, 18, 20), Level(spacing_mm=2.0, iterations=2, integration_steps=4))]
    options = dict(similarity="lncc", regularization=1.0, learning_rate=0.1, window=5)
    count = CancelOnCall(None)
    _, trace = optimise_velocity(fixed, moving, None, levels, is_cancelled=count, **options)
    assert len(trace) == 2
    assert count.calls == 5 + 2
    for n in (2, 3, 4, 5):
        with pytest.raises(RegistrationCancelled, match="optimisation"):
            optimise_velocity(fixed, moving, None, levels, is_cancelled=CancelOnCall(n), **options)


def test_det_j_statistics_slab_by_slab_equal_one_pass_and_stop_on_cancel(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    det = rng.lognormal(0.0, 0.3, size=(26, 23, 21)).astype(np.float32)
    det[rng.random(det.shape) < 0.01] = -0.5  # a few folded voxels
    jacobian = sitk.GetImageFromArray(det)
    inside = rng.random(det.shape) < 0.7
    mask = sitk.GetImageFromArray(inside.astype(np.uint8))
    logs = np.log(np.clip(det[inside].astype(np.float64), 1e-9, 1e9))
    folded = 100.0 * np.count_nonzero(det[inside] <= 0) / inside.sum()
    monkeypatch.setattr(metrics, "_JACOBIAN_BLOCK_VOXELS", 3 * 23 * 21)
    count = CancelOnCall(None)
    assert metrics.sdlogj(jacobian, mask, count) == pytest.approx(np.std(logs), rel=1e-12)
    assert count.calls == 9  # ceil(26 / 3) slabs
    assert metrics.folding_percent(jacobian, mask) == pytest.approx(folded, rel=1e-12)
    for statistic in (metrics.sdlogj, metrics.folding_percent):
        with pytest.raises(RegistrationCancelled, match="det J"):
            statistic(jacobian, mask, CancelOnCall(5))


def test_the_field_resampled_by_rows_equals_trilinear_sampling_with_zero_outside() -> None:
    """Against torch's grid_sample (corners aligned, zero padding): same interpolation, done
    in one gather, on a fixed grid that reaches past the network grid on every side."""
    network, fixed, flow = network_and_fixed_grids()
    resampler = warping.FieldOnGrid(flow, network, fixed)
    rows = [warping.row_block(fixed, start, min(start + 5, 26)) for start in range(0, 26, 5)]
    ours = torch.cat([resampler.block(block) for block in rows], 1)
    linear, constant = warping.index_map(fixed, network)
    index = warping.affine_field(linear, constant, fixed, 0, 26, "cpu")  # (K, J, I, 3) as I, J, K
    normalised = 2 * index / (torch.tensor(network.size, dtype=torch.float64) - 1) - 1
    expected = torch.nn.functional.grid_sample(
        flow.double(), normalised[None], mode="bilinear", padding_mode="zeros", align_corners=True
    )[0]
    assert (index < 0).any()
    assert (index > torch.tensor(network.size) - 1).any()
    torch.testing.assert_close(ours.double(), expected, rtol=0, atol=1e-5)


def test_the_affine_stage_works_on_copies_of_at_most_about_four_million_voxels() -> None:
    """A brain at 1 mm keeps its 2 mm copy; a 40 × 40 × 60 cm CT gets about 3 mm: making a
    copy cannot be interrupted, and an affine gains nothing from more voxels."""
    brain = sitk.Image([64, 64, 64], sitk.sitkUInt8)
    brain.SetSpacing((4.0, 4.0, 4.0))  # the extent of 256³ at 1 mm, without its memory
    assert affine.working_spacing(brain) == affine.WORKING_SPACING_MM
    ct = sitk.Image([64, 64, 75], sitk.sitkUInt8)
    ct.SetSpacing((6.24, 6.24, 8.0))  # the extent of 512² × 600 at 0.78 × 0.78 × 1 mm
    spacing = affine.working_spacing(ct)
    assert 2.8 < spacing < 3.0
    extent = np.asarray(ct.GetSize()) * np.asarray(ct.GetSpacing())
    assert np.prod(extent / spacing) == pytest.approx(affine.MAX_WORKING_VOXELS)
    assert affine.working_spacing(sitk.Image([512, 512], sitk.sitkUInt8)) == 2.0


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_normalising_maps_the_1st_and_99th_percentiles_to_0_and_1_and_can_be_stopped(dtype):
    from DeepRegisterLib.registration.preprocessing import normalised_for_registration

    rng = np.random.default_rng(3)
    values = np.clip(rng.normal(120, 60, (20, 30, 40)), 0, 255).astype(dtype)
    image = sitk.GetImageFromArray(values)
    low, high = np.percentile(values, [1.0, 99.0])
    expected = np.clip((values.astype(np.float64) - low) / (high - low), 0.0, 1.0)
    normalised = normalised_for_registration(image)
    assert normalised.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayViewFromImage(normalised), expected, atol=1e-6)
    with pytest.raises(RegistrationCancelled):
        normalised_for_registration(image, CancelOnCall(1))


def test_the_engine_normalises_each_image_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The affine stage and the network inputs share one normalised copy of each image (a
    second pass cost about a second per image on a 512² × 600 CT), with the same affine."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
    from DeepRegisterLib.registration import engine, preprocessing

    pair = phantom_pair(demo_grid(3, size=32), amplitude_mm=2.0)
    normalised = [preprocessing.normalised_for_registration(i) for i in (pair.fixed, pair.moving)]
    separate = affine_search.register_affine(pair.fixed, pair.moving, iterations=20)
    shared = affine_search.register_normalised(*normalised, iterations=20)
    assert separate.GetParameters() == shared.GetParameters()

    calls: list[int] = []
    original = preprocessing.normalised_for_registration

    def counted(image: sitk.Image, *args) -> sitk.Image:
        calls.append(image.GetNumberOfPixels())
        return original(image, *args)

    monkeypatch.setattr(preprocessing, "normalised_for_registration", counted)
    engine.register(pair.fixed, pair.moving, preset="fast", iterations=0, model=None)
    assert len(calls) == 2


def test_a_big_output_image_is_allocated_while_cancel_requests_are_answered(monkeypatch) -> None:
    """Above THREADED_ALLOCATION_VALUES ITK zero-fills the image in a helper thread while
    the caller keeps asking (below it, once: small runs ask equally often every time)."""
    monkeypatch.setattr(volumes, "THREADED_ALLOCATION_VALUES", 2**20)
    grid = Grid((200, 200, 200), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    count = CancelOnCall(None)
    image = volumes.allocate(grid, sitk.sitkVectorFloat64, 3, count)
    assert (image.GetSize(), image.GetNumberOfComponentsPerPixel()) == ((200, 200, 200), 3)
    assert Grid.of(image) == grid
    assert count.calls >= 2, "not asked while ITK zero-filled 192 MB"
    del image
    with pytest.raises(RegistrationCancelled, match="writing outputs"):
        volumes.allocate(grid, sitk.sitkVectorFloat64, 3, CancelOnCall(2))
    small = CancelOnCall(None)
    volumes.allocate(Grid.of(sitk.Image([8, 8], sitk.sitkUInt8)), sitk.sitkFloat32, 1, small)
    assert small.calls == 1
