"""The affine stage: moments initialisation, turned starts tried, then a rigid and an affine
search, coarse to fine, each maximising the mutual information of sampled voxels
(affine_levels.py) by gradient descent.

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

import math
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import stop_if_cancelled
from ..imaging.geometry import Grid
from ..imaging.intensity_window import IntensityWindow
from ..nn.devices import resolve_device
from .affine import WorkingCopies, is_small, recentred, to_affine
from .affine_levels import Level, Levels, Pose
from .preprocessing import normalised_pair

ProgressCallback = Callable[[float, str], None]
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
# Turned starts. Within its 30 steps a search turns a brain by about 30° at most: turned 45° in
# its header, a moving brain ended `fast` below 0.22 mean Dice on 3 of 12 fs-dev pairs. So the
# start is tried against itself turned by ±TURN_DEGREES about each axis: TURN_TRIAL_STEPS rigid
# steps from each at the coarsest level, all at once, on TURN_TRIAL_SAMPLES voxels (a step costs
# a third of one on 20 000). The TURN_CANDIDATES turns that reach the highest mutual information,
# when TURN_MARGIN above the start's, are each turned on while that gains TURN_MARGIN more
# (MAX_TURNS turns in all); the full rigid search then runs from them and from the start at
# once, and the pose highest at the finest rigid level is kept. The trials' few steps are a weak
# judge: on a 60 mm slab an unturned start's turn came within 0.0015 of replacing it, and a
# brain turned 90° about x was judged turned back the wrong way (a half-turn from the truth) by
# 0.017 on one fs-dev pair, which the full search set right. Half-turns are not tried: at 8 mm
# a skull-stripped brain and its half-turn are too alike (an unturned pair's half-turn scored
# higher). With 45° turns alone, 90° needed two to chain, and 8 of 20 fs-dev pairs failed.
TURN_DEGREES = (45.0, 90.0)
TURN_TRIAL_STEPS = 8
TURN_TRIAL_SAMPLES = 5000
TURN_MARGIN = 0.01
TURN_CANDIDATES = 2
MAX_TURNS = 2


def _angles(dim: int) -> int:
    """A rotation's angles: one in 2D, three in 3D."""
    return 1 if dim == 2 else 3


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotations by (poses, 1) angles in 2D or (poses, 3) in 3D (about x, then y, then z)."""
    cos, sin = torch.cos(angles).unbind(-1), torch.sin(angles).unbind(-1)
    poses = len(angles)
    if len(cos) == 1:
        return torch.stack([cos[0], -sin[0], sin[0], cos[0]], dim=-1).view(poses, 2, 2)
    (cx, cy, cz), (sx, sy, sz) = cos, sin
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    about_x = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], dim=-1)
    about_y = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], dim=-1)
    about_z = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], dim=-1)
    return about_z.view(poses, 3, 3) @ about_y.view(poses, 3, 3) @ about_x.view(poses, 3, 3)


def _search(
    levels: list[Level],
    start: Pose,
    rigid: bool,
    iterations: int,
    radius_mm: float,
    tick: Callable[[], None],
    given_start: bool,
) -> Pose:
    """Regular-step gradient descent from each of ``start``'s poses at once, each with its own
    step, over parameters that each move points by about a millimetre per unit (angles and
    matrix entries are scaled by ``radius_mm``, shifts are in millimetres), restarted at each
    level: from FIRST_STEP_VOXELS of the level's voxels (at most MAX_FIRST_TURN), or from
    GIVEN_START_STEP for a caller's start."""
    poses, dim = start.shift.shape
    device = start.shift.device
    linear_count = _angles(dim) if rigid else dim * dim
    parameters = torch.zeros(
        poses, linear_count + dim, dtype=torch.float64, device=device, requires_grad=True
    )
    identity = torch.eye(dim, dtype=torch.float64, device=device)

    def pose() -> Pose:
        linear = parameters[:, :linear_count] / radius_mm
        change = _rotation(linear) if rigid else identity + linear.view(poses, dim, dim)
        return Pose(change @ start.matrix, start.shift + parameters[:, linear_count:])

    for level in levels:
        first = (
            GIVEN_START_STEP
            if given_start
            else min(FIRST_STEP_VOXELS * level.spacing_mm, MAX_FIRST_TURN * radius_mm)
        )
        step = torch.full((poses,), first, dtype=torch.float64, device=device)
        previous = None
        for _ in range(iterations):
            tick()
            if not bool((step >= MIN_STEP).any()):
                continue  # converged: the remaining iterations only count for progress
            parameters.grad = None
            (-level.similarity(pose()).sum()).backward()
            gradient = parameters.grad.detach().clone()
            if previous is not None:  # where it turned back, the optimum is within the step
                step = torch.where((gradient * previous).sum(-1) < 0, step * RELAXATION, step)
            previous = gradient
            length = gradient.norm(dim=-1, keepdim=True)
            moves = (step[:, None] >= MIN_STEP) & (length > 0)
            with torch.no_grad():
                parameters -= torch.where(moves, step[:, None] * gradient / length, 0.0)
    with torch.no_grad():
        return pose()


def _rigid_search(
    levels: list[Level],
    trial: Level | None,
    start: Pose,
    iterations: int,
    radius_mm: float,
    tick: Callable[[], None],
    check: Callable[[], None],
) -> Pose:
    """The rigid search from ``start`` and, where the trials on ``trial`` (if any) find turned
    starts, from those at once: the pose highest on the finest level (the start's on a tie).
    The trials ask ``check``; the search reports its steps (``tick``)."""
    turned = None if trial is None else _turned_starts(trial, start, radius_mm, check)
    if turned is None:
        return _search(levels, start, True, iterations, radius_mm, tick, False)
    found = _search(levels, Pose.joined(start, turned), True, iterations, radius_mm, tick, False)
    with torch.no_grad():
        best = int(levels[-1].similarity(found).argmax())
    return found.picked([best])


def _turned_starts(
    level: Level, start: Pose, radius_mm: float, check: Callable[[], None]
) -> Pose | None:
    """The TURN_CANDIDATES turns of ``start`` (one pose) whose few rigid steps reach the
    highest similarity, TURN_MARGIN above those from ``start`` itself, each turned on while that
    gains TURN_MARGIN more (MAX_TURNS turns in all); None when no turn gains it."""

    def reached(poses: Pose) -> torch.Tensor:
        found = _search([level], poses, True, TURN_TRIAL_STEPS, radius_mm, check, False)
        with torch.no_grad():
            return level.similarity(found)

    turns = _turned(start)
    values = reached(Pose.joined(start, turns))
    above, values = values[0] + TURN_MARGIN, values[1:]
    order = values.argsort(descending=True)[:TURN_CANDIDATES]
    order = order[values[order] > above]
    if len(order) == 0:
        return None
    best, best_values = turns.picked(order), values[order]
    for _ in range(MAX_TURNS - 1):
        turns = _turned(best)
        values = reached(turns).view(len(order), -1)
        gains, chosen = values.max(dim=1)
        turn_on = gains > best_values + TURN_MARGIN
        if not bool(turn_on.any()):
            break
        # Indices into (turns, best): each candidate's best turn, or the candidate itself.
        candidate = torch.arange(len(order), device=values.device)
        turned_row = candidate * values.shape[1] + chosen
        kept_row = len(turns.shift) + candidate
        best = Pose.joined(turns, best).picked(torch.where(turn_on, turned_row, kept_row))
        best_values = torch.where(turn_on, gains, best_values)
    return best


def _turned(start: Pose) -> Pose:
    """Each of ``start``'s poses turned by ±TURN_DEGREES about each axis (about the fixed
    image's centre), the turns of one pose together."""
    poses, dim = start.shift.shape
    axes = _angles(dim)
    signed = [sign * math.radians(degrees) for degrees in TURN_DEGREES for sign in (-1.0, 1.0)]
    angles = torch.zeros(axes, len(signed), axes, dtype=torch.float64, device=start.matrix.device)
    for axis in range(axes):
        angles[axis, :, axis] = torch.tensor(signed, dtype=torch.float64)
    turns = _rotation(angles.reshape(-1, axes))  # about each axis in turn
    matrices = turns[None] @ start.matrix[:, None]
    return Pose(
        matrices.reshape(-1, dim, dim),
        start.shift[:, None].expand(poses, len(turns), dim).reshape(-1, dim),
    )


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
    finest_mm: float = 4.0,
    is_cancelled: Callable[[], bool] = lambda: False,
    **options,
) -> sitk.AffineTransform:
    """:func:`register_affine` of images already through :func:`normalised_for_registration`,
    which callers that need them normalised anyway (the engine, training) do only once:
    :func:`search_copies` of their working copies, ``finest_mm`` the last level's spacing (the
    working spacing or coarser), with the same ``options``."""
    copies = WorkingCopies((fixed, moving), (fixed_mask, moving_mask), finest_mm, is_cancelled)
    return search_copies(copies, is_cancelled=is_cancelled, **options)


def search_copies(
    copies: WorkingCopies,
    *,
    initial_transform: sitk.Transform | None = None,
    iterations: int = 50,
    seed: int = 0,
    device: str = "cpu",
    progress: ProgressCallback | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.AffineTransform:
    """The affine search over a pair's working copies, fixed → moving points.

    ``iterations`` steps at each level at most. ``initial_transform`` (linear) replaces the
    moments initialisation, the turned starts and the rigid search when given. ``device`` is a
    run's setting ("auto", "cpu", "cuda"…).
    """
    fixed = copies.images[0]
    dim = fixed.GetDimension()
    rigid_mm, affine_mm = copies.rigid_mm, copies.affine_mm
    centre = np.asarray(
        fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    )
    levels = Levels(copies, centre, seed, resolve_device(device))
    given_start = initial_transform is not None
    first = initial_transform if given_start else copies.moments()
    total = iterations * (len(affine_mm) + (0 if given_start else len(rigid_mm)))
    done = 0

    def check() -> None:
        stop_if_cancelled(is_cancelled, "during the affine stage")

    def tick() -> None:
        nonlocal done
        check()
        done += 1
        if progress is not None:
            progress(min(done / total, 1.0), "affine")

    start = _pose(recentred(to_affine(first, dim), centre), levels.device)
    radius_mm = float(np.linalg.norm(Grid.of(fixed).extent_mm)) / 4.0
    with torch.enable_grad():
        if not given_start:
            rigid_levels = [levels.at(mm) for mm in rigid_mm]
            trial = None if is_small(fixed) else levels.at(rigid_mm[0], TURN_TRIAL_SAMPLES)
            start = _rigid_search(rigid_levels, trial, start, iterations, radius_mm, tick, check)
        affine_levels = [levels.at(mm) for mm in affine_mm]
        start = _search(affine_levels, start, False, iterations, radius_mm, tick, given_start)
    return to_affine(_transform(start, centre), dim)


def _pose(transform: sitk.AffineTransform, device: torch.device) -> Pose:
    dim = transform.GetDimension()
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(dim, dim)
    shift = torch.tensor(transform.GetTranslation(), dtype=torch.float64)
    return Pose(torch.from_numpy(matrix)[None].to(device), shift[None].to(device))


def _transform(pose: Pose, centre: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(len(centre))
    transform.SetCenter(tuple(float(c) for c in centre))
    transform.SetMatrix(tuple(pose.matrix[0].cpu().numpy().ravel()))
    transform.SetTranslation(tuple(pose.shift[0].cpu().numpy()))
    return transform
