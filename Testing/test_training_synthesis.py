"""Training pair synthesis on tiny data: determinism, intensities, the true flow, label maps
read from files, aligned label maps and their cache, and other-subject pairs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tiny_training
import torch
import torch.nn.functional as F
from tiny_training import SHAPES, _head

from DeepRegisterLib.errors import InputError
from DeepRegisterLib.imaging import metrics
from DeepRegisterLib.imaging.geometry import Grid, flow_voxels_to_mm
from DeepRegisterLib.nn.networks import identity_grid, warp
from DeepRegisterLib.training import label_maps
from DeepRegisterLib.training.config import SynthesisConfig
from DeepRegisterLib.training.label_maps import LabelMaps, load_label_maps
from DeepRegisterLib.training.synthesis import Synthesiser

# The shared autouse fixture, bound here for pytest to find and use in this module.
one_thread = tiny_training.one_thread


def _dice(fixed: torch.Tensor, warped: torch.Tensor) -> float:
    labels = [v for v in torch.unique(fixed).tolist()]
    return float(
        np.mean(
            [
                2
                * float(((fixed == v) & (warped == v)).sum())
                / float((fixed == v).sum() + (warped == v).sum())
                for v in labels
            ]
        )
    )


# --- synthesis -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_synthesis_is_deterministic_given_the_generator(dim: int) -> None:
    synthesiser = Synthesiser(SHAPES[dim])
    first = synthesiser(torch.Generator().manual_seed(5), batch=2)
    again = synthesiser(torch.Generator().manual_seed(5), batch=2)
    other = synthesiser(torch.Generator().manual_seed(6), batch=2)
    for name in ("fixed", "moving", "fixed_labels", "moving_labels", "flow"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.fixed, other.fixed)
    assert first.fixed.shape == (2, 1, *SHAPES[dim])
    assert first.flow.shape == (2, dim, *SHAPES[dim])
    assert float(first.fixed.min()) >= 0.0
    assert float(first.fixed.max()) <= 1.0


def test_a_zero_background_pair_is_black_outside_its_labels_like_a_skull_stripped_scan() -> None:
    black = Synthesiser(SHAPES[3], SynthesisConfig(zero_background=1.0))
    pair = black(torch.Generator().manual_seed(3))
    for image, labels in ((pair.fixed, pair.fixed_labels), (pair.moving, pair.moving_labels)):
        assert bool((labels == 0).any())
        assert float(image[labels == 0].abs().max()) == 0.0
        assert float(image[labels != 0].mean()) > 0.1

    # The mask is drawn last: everything else is the pair the default (0, no draw) gives.
    plain = Synthesiser(SHAPES[3])(torch.Generator().manual_seed(3))
    assert torch.equal(pair.moving, plain.moving * (plain.moving_labels != 0))
    assert float(plain.fixed[plain.fixed_labels == 0].abs().max()) > 0.0


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_each_label_has_one_intensity_up_to_noise(noise: float) -> None:
    """Without blur, bias and gamma, a label's voxels share one mean: their spread is the
    per-label noise only, well below the spread between labels' means."""
    config = SynthesisConfig(intensity_std=noise, blur_sigma=0.0, bias_std=0.0, gamma_std=0.0)
    pair = Synthesiser((48, 48), config)(torch.Generator().manual_seed(1))
    image, labels = pair.fixed.flatten(), pair.fixed_labels.flatten()
    inside = (image > 0) & (image < 1)  # the percentile normalisation clamps the extremes
    means, spreads = [], []
    for label in torch.unique(labels).tolist():
        values = image[(labels == label) & inside]
        if values.numel() > 10:
            means.append(float(values.mean()))
            spreads.append(float(values.std()))
    assert len(means) >= 5
    if noise == 0.0:
        assert max(spreads) < 1e-5
    else:
        assert 0 < np.median(spreads) < 0.1 < np.std(means)


@pytest.mark.parametrize("dim", [2, 3])
def test_the_true_flow_maps_fixed_labels_onto_moving_labels(dim: int) -> None:
    shape = (64, 64) if dim == 2 else (32, 32, 32)
    config = SynthesisConfig(shape_spacing=16.0, shape_labels=6)
    pair = Synthesiser(shape, config)(torch.Generator().manual_seed(3))
    one_hot = F.one_hot(pair.moving_labels[:, 0], 6).movedim(-1, 1).float()
    warped = warp(one_hot, pair.flow).argmax(dim=1, keepdim=True)
    # Only where x + flow(x) falls inside the moving image does it hold the answer.
    target = identity_grid(shape, torch.device("cpu")) + pair.flow
    size = torch.tensor(shape).view(1, dim, *([1] * dim))
    inside = ((target >= 0) & (target <= size - 1)).all(dim=1, keepdim=True)
    assert inside.float().mean() > 0.8
    assert _dice(pair.fixed_labels[inside], warped[inside]) > 0.9
    assert _dice(pair.fixed_labels, pair.moving_labels) < 0.8  # the pair really is deformed

    # Diffeomorphic: the Jacobian determinant of x ↦ x + flow(x) is positive everywhere.
    grid = Grid((*shape[::-1],), (1.0,) * dim, (0.0,) * dim, tuple(np.eye(dim).ravel()))
    vectors = flow_voxels_to_mm(pair.flow.double(), grid)[0].movedim(0, -1).numpy()
    displacement = grid.apply_to(sitk.GetImageFromArray(vectors, isVector=True))
    assert metrics.folding_percent(metrics.jacobian_determinant(displacement)) == 0.0


def test_label_maps_from_files_are_resampled_cropped_and_relabelled(tmp_path: Path) -> None:
    array = np.zeros((30, 30, 30), dtype=np.int16)
    array[5:25, 6:24, 8:22] = 7
    array[10:20, 10:20, 10:20] = 3
    array[12:14, 12:14, 12:14] = 502  # extra-cerebral in SynthSeg's convention
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(image, str(path))

    maps = load_label_maps([path], spacing_mm=2.0, background_from=100)
    assert maps.values == [0, 3, 7]
    assert maps.names == ["labels.nii.gz"]
    (volume,) = maps.maps
    assert volume.dim() == 3
    assert max(volume.shape) < 30  # 2 mm, cropped to the labels + margin
    assert set(torch.unique(volume).tolist()) == {0, 1, 2}

    pair = Synthesiser((16, 16), label_maps=maps)(torch.Generator().manual_seed(0))
    assert pair.fixed.shape == (1, 1, 16, 16)  # 2D training takes slices of 3D maps
    assert set(torch.unique(pair.fixed_labels).tolist()) <= {0, 1, 2}


def test_aligned_label_maps_share_the_first_grid_in_register(tmp_path: Path) -> None:
    """A second subject in another pose is brought onto the first map's grid by the affine
    stage: pairs of two maps then differ by anatomy, not by pose."""
    pose = sitk.Euler3DTransform((23.5, 23.5, 23.5), 0.0, 0.0, np.radians(10), (3.0, -2.0, 0.0))
    first, second = _head(tmp_path, "a.nii.gz"), _head(tmp_path, "b.nii.gz", pose)

    as_they_are = load_label_maps([first, second], spacing_mm=2.0)
    aligned = load_label_maps([first, second], spacing_mm=2.0, align=True)

    assert not as_they_are.aligned
    assert aligned.aligned
    assert aligned.maps[0].shape == aligned.maps[1].shape
    assert torch.equal(aligned.maps[0], as_they_are.maps[0])
    assert _dice(aligned.maps[0], aligned.maps[1]) > 0.9
    unmoved = [torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(p))) for p in (first, second)]
    assert _dice(*unmoved) < 0.8  # the pose difference that the alignment removed


def test_aligned_label_maps_come_from_the_cache_while_files_and_options_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache saves minutes at every resume, and is never trusted when anything changed."""
    pose = sitk.Euler3DTransform((23.5, 23.5, 23.5), 0.0, 0.0, np.radians(10), (3.0, -2.0, 0.0))
    paths = [_head(tmp_path, "a.nii.gz"), _head(tmp_path, "b.nii.gz", pose)]
    cache = tmp_path / "aligned.pt"
    registrations = []
    register = label_maps.register_normalised
    monkeypatch.setattr(
        label_maps,
        "register_normalised",
        lambda *args, **kwargs: registrations.append(1) or register(*args, **kwargs),
    )

    def load(spacing_mm: float = 2.0) -> LabelMaps:
        return load_label_maps(paths, spacing_mm, align=True, cache=cache)

    first = load()
    assert len(registrations) == 1
    assert cache.exists()
    again = load()
    assert len(registrations) == 1  # from the cache
    assert again.aligned
    assert (again.names, again.values) == (first.names, first.values)
    assert all(torch.equal(a, b) for a, b in zip(first.maps, again.maps, strict=True))

    load(spacing_mm=3.0)  # another option: computed again (and cached for it)
    assert len(registrations) == 2
    _head(tmp_path, "b.nii.gz")  # the second subject's file changed
    load(spacing_mm=3.0)
    assert len(registrations) == 3
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    load(spacing_mm=3.0)
    assert len(registrations) == 4


def _two_subjects(aligned: bool = True) -> LabelMaps:
    one = torch.ones((24, 24, 24), dtype=torch.uint8)
    return LabelMaps([one, 2 * one], [0, 1, 2], 1.0, ["one", "two"], aligned=aligned)


@pytest.mark.parametrize("dim", [2, 3])
def test_other_subject_pairs_take_the_moving_labels_from_another_map(dim: int) -> None:
    def nonzero(labels: torch.Tensor) -> set[int]:
        return set(torch.unique(labels).tolist()) - {0}

    generator = torch.Generator().manual_seed(0)
    other = Synthesiser(SHAPES[dim], SynthesisConfig(other_subject=1.0), _two_subjects())
    for _ in range(4):
        pair = other(generator)
        assert {*nonzero(pair.fixed_labels), *nonzero(pair.moving_labels)} == {1, 2}
        assert pair.flow is None  # two anatomies: no true flow exists

    same = Synthesiser(SHAPES[dim], SynthesisConfig(other_subject=0.0), _two_subjects())
    pair = same(generator, batch=2)
    assert nonzero(pair.fixed_labels[:1]) == nonzero(pair.moving_labels[:1])
    assert pair.flow is not None
    assert pair.flow.shape == (2, dim, *SHAPES[dim])


@pytest.mark.parametrize("maps", [None, _two_subjects(aligned=False)])
def test_other_subject_pairs_need_aligned_label_maps(maps: LabelMaps | None) -> None:
    with pytest.raises(InputError, match="align=True"):
        Synthesiser((16, 16, 16), SynthesisConfig(other_subject=0.5), maps)
