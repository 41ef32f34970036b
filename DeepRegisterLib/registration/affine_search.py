"""The affine stage: moments initialisation, then a rigid and an affine search, coarse to fine,
each maximising the mutual information of sampled voxels by gradient descent.

In PyTorch on all of the CPU's threads, rather than on ITK's registration framework: ITK's
Mattes metric gives the same result for the same seed only on one thread, and it called back
into Python at every iteration (for progress and cancelling), waiting on the interpreter lock
while torch loaded beside it. For `fast` on fs-dev brains that stage took 1.3 s alone and 2–3 s
in a run; this search takes about 0.5 s, and the affine it finds is closer (mean Dice over 27
structures of the affine alone 0.601 → 0.641 on eight pairs, and 0.625 → 0.683 on four with
one image's contrast inverted). A seeded sample and sums in a fixed order: the same inputs and
seed give the same transform on the CPU. On a GPU the search runs there too (a process that
stays, with torch and CUDA loaded, otherwise waits for the CPU's threads), with the same sample;
its histogram sums in no fixed order, so there the last bits can differ between runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import stop_if_cancelled
from ..imaging.geometry import Grid
from ..imaging.intensity_window import IntensityWindow
from ..nn.devices import resolve_device
from ..nn.filters import grid_sample
from ..nn.mutual_information import SampledMutualInformation
from .affine import level_spacings, moments_transform, recentred, to_affine, working_copy
from .preprocessing import normalised_pair

ProgressCallback = Callable[[float, str], None]
MIN_METRIC_SAMPLES = 20_000
SAMPLED_FRACTION = 0.05
# Regular-step gradient descent, as ITK's: each step moves along the gradient's direction by
# ``step`` parameter units (about a millimetre of point motion each), and the step is cut by
# RELAXATION each time the direction turns back; a level's search ends below MIN_STEP. Adam,
# tried instead, found closer affines on fs-dev brains (0.655 against 0.641 mean Dice of the
# affine alone), but its normalised first steps left a good start on small phantoms for
# another optimum.
# A level's first step moves points by FIRST_STEP_VOXELS of its own voxels (32 mm at 8 mm),
# but by at most MAX_FIRST_TURN of ``radius_mm`` (a turn of 0.2 rad, a shift of a twentieth
# of the image's diagonal; 22 mm for a 1 mm brain): uncapped, a 128 mm 2D phantom ended 19 mm
# off. With a first step of 1 mm at every level, 30 steps could turn a brain by at most about
# 17° a level: with the moving brain turned in its header about one axis (x, y or z, either
# way), the affine alone scored 0.638 mean Dice at 15°, 0.430 at 30° and 0.199 at 45° on four
# fs-dev pairs, against 0.671 unturned; now 0.677, 0.636 and 0.433 (0.677 unturned). On the
# 20 pairs unturned, the affine alone 0.670 against 0.666 (better on 12), `fast` after it
# 0.8331 against 0.8324 (better on 12). Uncapped 4 voxels reached a little further (0.654 at
# 30°) for the same Dice after `fast`; 2 voxels less far (0.608).
FIRST_STEP_VOXELS = 4.0
MAX_FIRST_TURN = 0.2
# From a caller's start (an initial transform), which is meant to be close already.
GIVEN_START_STEP = 1.0
RELAXATION = 0.6
MIN_STEP = 1e-4


@dataclass(frozen=True)
class Pose:
    """Fixed → moving points: ``y = matrix (x − centre) + centre + shift``."""

    matrix: torch.Tensor  # (dim, dim) float64
    shift: torch.Tensor  # (dim,) float64


class _Level:
    """One resolution: fixed voxels sampled once (as offsets from the centre), the moving copy,
    and the mutual information of the two under a pose."""

    def __init__(
        self,
        fixed: sitk.Image,
        moving: sitk.Image,
        masks: tuple[sitk.Image | None, sitk.Image | None],
        spacing_mm: float,
        centre: np.ndarray,
        generator: torch.Generator,
        device: torch.device,
    ):
        fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
        self.spacing_mm = spacing_mm
        values = torch.from_numpy(sitk.GetArrayFromImage(fixed)).reshape(-1)
        candidates = torch.arange(values.numel())
        if masks[0] is not None:
            candidates = torch.from_numpy(sitk.GetArrayViewFromImage(masks[0]).ravel() > 0)
            candidates = candidates.nonzero()[:, 0]
        count = min(
            len(candidates), max(MIN_METRIC_SAMPLES, round(SAMPLED_FRACTION * len(candidates)))
        )
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        chosen = chosen.sort().values  # memory order: the moving copy is read in fewer lines
        index_kji = np.stack(np.unravel_index(chosen.numpy(), fixed_grid.shape), axis=-1)
        points = fixed_grid.index_to_physical_points(index_kji[:, ::-1].astype(np.float64))
        self.offsets = torch.from_numpy(points - centre).float().to(device)
        self.metric = SampledMutualInformation(values[chosen].to(device))
        self.moving = _as_volume(moving, device)
        self.moving_mask = None if masks[1] is None else _as_volume(masks[1], device)
        # grid_sample's coordinates of a moving point: ``scale · (A y + b) − 1`` per axis.
        to_index, offset = moving_grid.physical_to_index_affine()
        scale = moving_grid.index_to_sampler_scale
        self._to_sampler = torch.from_numpy(scale[:, None] * to_index).to(device)
        self._sampler_offset = torch.from_numpy(scale * offset - 1.0).to(device)
        self._centre = torch.from_numpy(centre).to(device)

    def similarity(self, pose: Pose) -> torch.Tensor:
        linear = self._to_sampler @ pose.matrix
        constant = self._to_sampler @ (self._centre + pose.shift) + self._sampler_offset
        coordinates = torch.addmm(constant.float(), self.offsets, linear.float().T)
        dim = coordinates.shape[-1]
        where = coordinates.view(1, *[1] * (dim - 1), -1, dim)
        inside = (coordinates.abs().amax(dim=-1) <= 1.0).float()
        if self.moving_mask is not None:
            within = grid_sample(self.moving_mask, where.detach(), "nearest").reshape(-1)
            inside = inside * (within > 0).float()
        values = grid_sample(self.moving, where, "bilinear", "border").reshape(-1)
        return self.metric(values, inside)


def _as_volume(image: sitk.Image, device: torch.device) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return torch.from_numpy(array)[None, None].to(device)


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """A 2D rotation by one angle, or a 3D one by three (about x, then y, then z)."""
    cos, sin = torch.cos(angles), torch.sin(angles)
    one, zero = torch.ones_like(angles[0]), torch.zeros_like(angles[0])
    if angles.numel() == 1:
        return torch.stack([cos[0], -sin[0], sin[0], cos[0]]).view(2, 2)
    (cx, cy, cz), (sx, sy, sz) = cos, sin
    about_x = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx]).view(3, 3)
    about_y = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy]).view(3, 3)
    about_z = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one]).view(3, 3)
    return about_z @ about_y @ about_x


def _search(
    levels: list[_Level],
    start: Pose,
    rigid: bool,
    iterations: int,
    radius_mm: float,
    tick: Callable[[], None],
    given_start: bool,
) -> Pose:
    """Regular-step gradient descent over parameters that each move points by about a
    millimetre per unit (angles and matrix entries are scaled by ``radius_mm``, shifts are in
    millimetres), restarted at each level: from FIRST_STEP_VOXELS of the level's voxels (at
    most MAX_FIRST_TURN), or from GIVEN_START_STEP for a caller's start."""
    dim, device = start.shift.numel(), start.shift.device
    linear_count = (1 if dim == 2 else 3) if rigid else dim * dim
    parameters = torch.zeros(
        linear_count + dim, dtype=torch.float64, device=device, requires_grad=True
    )
    identity = torch.eye(dim, dtype=torch.float64, device=device)

    def pose() -> Pose:
        linear = parameters[:linear_count] / radius_mm
        change = _rotation(linear) if rigid else identity + linear.view(dim, dim)
        return Pose(change @ start.matrix, start.shift + parameters[linear_count:])

    for level in levels:
        step = (
            GIVEN_START_STEP
            if given_start
            else min(FIRST_STEP_VOXELS * level.spacing_mm, MAX_FIRST_TURN * radius_mm)
        )
        previous = None
        for _ in range(iterations):
            tick()
            if step < MIN_STEP:
                continue  # converged: the remaining iterations only count for progress
            parameters.grad = None
            (-level.similarity(pose())).backward()
            gradient = parameters.grad.detach().clone()
            if previous is not None and float(gradient @ previous) < 0:
                step *= RELAXATION  # it turned back: the optimum is within the last step
            previous = gradient
            length = float(gradient.norm())
            if step >= MIN_STEP and length > 0:
                with torch.no_grad():
                    parameters -= step * gradient / length
    with torch.no_grad():
        return pose()


def register_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    is_cancelled: Callable[[], bool] = lambda: False,
    **options,
) -> sitk.AffineTransform:
    """Affine transform mapping fixed → moving points (ITK resampling convention).

    Normalises both images as the engine does (mutual information is blind to the inversion
    of a bright background), then :func:`register_normalised` with the same ``options``.
    """
    windows = (IntensityWindow.of(fixed), IntensityWindow.of(moving))
    fixed_norm, moving_norm, _ = normalised_pair(
        fixed, moving, windows, one_contrast=False, is_cancelled=is_cancelled
    )
    return register_normalised(fixed_norm, moving_norm, is_cancelled=is_cancelled, **options)


def register_normalised(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    initial_transform: sitk.Transform | None = None,
    iterations: int = 50,
    finest_mm: float = 4.0,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.AffineTransform:
    """:func:`register_affine` of images already through :func:`normalised_for_registration`,
    which callers that need them normalised anyway (the engine, training) do only once.

    ``iterations`` steps at each level at most; ``finest_mm`` is the last level's spacing (the
    working spacing or coarser). ``initial_transform`` (linear) replaces the moments
    initialisation and the rigid search when given. ``device`` is a run's setting ("auto",
    "cpu", "cuda"…).
    """
    dim = fixed.GetDimension()
    rigid_mm, affine_mm = level_spacings(fixed, finest_mm)
    centre = np.asarray(
        fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    )
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same sample everywhere
    where = resolve_device(device)
    copies: dict[float, tuple[sitk.Image, sitk.Image]] = {}
    levels: dict[float, _Level] = {}

    def copies_at(spacing_mm: float) -> tuple[sitk.Image, sitk.Image]:
        if spacing_mm not in copies:
            stop_if_cancelled(is_cancelled, "during the affine stage")
            copies[spacing_mm] = tuple(
                working_copy(image, spacing_mm, is_cancelled=is_cancelled)
                for image in (fixed, moving)
            )
        return copies[spacing_mm]

    def level(spacing_mm: float) -> _Level:
        if spacing_mm not in levels:
            masks = tuple(
                None
                if mask is None
                else working_copy(mask, spacing_mm, mask=True, is_cancelled=is_cancelled)
                for mask in (fixed_mask, moving_mask)
            )
            levels[spacing_mm] = _Level(
                *copies_at(spacing_mm), masks, spacing_mm, centre, generator, where
            )
        return levels[spacing_mm]

    if initial_transform is None:
        searches = [(rigid_mm, True), (affine_mm, False)]
        first = moments_transform(*copies_at(affine_mm[-1]))
    else:
        searches = [(affine_mm, False)]
        first = initial_transform
    total = iterations * sum(len(spacings) for spacings, _ in searches)
    done = 0

    def tick() -> None:
        nonlocal done
        stop_if_cancelled(is_cancelled, "during the affine stage")
        done += 1
        if progress is not None:
            progress(min(done / total, 1.0), "affine")

    start = _pose(recentred(to_affine(first, dim), centre), where)
    radius_mm = float(np.linalg.norm(Grid.of(fixed).extent_mm)) / 4.0
    with torch.enable_grad():
        for spacings, rigid in searches:
            start = _search(
                [level(mm) for mm in spacings], start, rigid, iterations, radius_mm, tick,
                given_start=initial_transform is not None,
            )  # fmt: skip
    return to_affine(_transform(start, centre), dim)


def _pose(transform: sitk.AffineTransform, device: torch.device) -> Pose:
    dim = transform.GetDimension()
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(dim, dim)
    shift = torch.tensor(transform.GetTranslation(), dtype=torch.float64)
    return Pose(torch.from_numpy(matrix).to(device), shift.to(device))


def _transform(pose: Pose, centre: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(len(centre))
    transform.SetCenter(tuple(float(c) for c in centre))
    transform.SetMatrix(tuple(pose.matrix.cpu().numpy().ravel()))
    transform.SetTranslation(tuple(pose.shift.cpu().numpy()))
    return transform
