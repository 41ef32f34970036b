"""The affine stage: moments initialisation, turned starts tried, then a rigid and an affine
search, coarse to fine, each maximising the mutual information of sampled voxels
(affine_levels.py) by gradient descent.

Each level's descent is one call to compiled code (affine_descent.c), on one CPU thread and
without torch, so that a fresh process runs the whole search while torch's import (about a
second of one core) holds the other: the search in PyTorch waited for it and then took about
0.5 s of a `fast` run. Rather than ITK's registration framework, whose Mattes metric gives the
same result for the same seed only on one thread and called back into Python at every
iteration. A seeded sample and sums in sample order: the same inputs and seed give the same
transform. Where the compiled module was not built, affine_torch.py runs the same descent.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import stop_if_cancelled
from ..imaging.geometry import Grid
from ..imaging.intensity_window import IntensityWindow
from . import affine_descent
from .affine import WorkingCopies, is_small, recentred, to_affine
from .affine_levels import Level, Levels, Pose, Steps, parameter_count
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
# when TURN_MARGIN above the start's, and each one's turn the other way about its axis, are each
# turned on while that gains TURN_MARGIN more (MAX_TURNS turns in all); the full rigid search
# then runs from the start, those turns and the turns they were turned on from, all at once, and
# the pose highest on every voxel of the finest rigid level (JUDGE_SAMPLES at most) is kept.
# The trials' few steps are a weak judge: on a 60 mm slab an unturned start's turn came within
# 0.0015 of replacing it; on an fs-dev pair turned 90° about x (sub-02 → sub-04) they preferred
# the wrong way (a half-turn from the truth), by 0.03 with seed 0, and with seeds 1 and 2 ranked
# the right way third, so only its pairing with the wrong way brought it to the full search.
# The search's own sample is a weak judge too: there it scored the wrong way's end 0.016 above
# the right one's, every voxel 0.004 below. So judged, the 20 pairs turned 90° end within 1.4 mm
# with seeds 0, 1 and 2. (Judged after the affine search instead, that pair scored the right way
# 0.036 above the rest, but a phantom turned 75° about y ended 6.6 mm off: its affine search ends
# lower than its rigid one.) No turn gains the margin on the 20 fs-dev pairs unturned, brains or
# whole heads. With 45° turns alone, 90° needed two to chain, and 8 of 20 fs-dev pairs failed.
# Half-turns (a header's axes negated in pairs: LPS read as RAS, feet first read as head first)
# skip the trials: at 8 mm a skull-stripped brain and its half-turn are too alike (the trials
# ranked an upside-down brain's start above the half-turn that rights it), and 56 of 60 affines
# of the 20 fs-dev pairs turned 180° (seeds 0, 1 and 2) ended 24–206 mm off. So the start's
# half-turn about each axis always runs the full rigid search, and the judge decides: all 60
# righted, and unturned every start kept (by 0.007 at least, 0.066 typically; heads by 0.11).
TURN_DEGREES = (45.0, 90.0)
TURN_TRIAL_STEPS = 8
TURN_TRIAL_SAMPLES = 5000
TURN_MARGIN = 0.01
TURN_CANDIDATES = 2
MAX_TURNS = 2
JUDGE_SAMPLES = 1_000_000  # a brain's 4 mm level has 262 144 voxels
# ±TURN_DEGREES in radians, each turn beside its turn the other way (_turned_starts pairs them).
SIGNED_TURNS = tuple(sign * math.radians(d) for d in TURN_DEGREES for sign in (-1.0, 1.0))


def _kernel():
    """The compiled descent (affine_descent.c), or the same in PyTorch where it was not
    built."""
    if affine_descent.available():
        return affine_descent
    from . import affine_torch

    return affine_torch


def _search(
    levels: list[Level],
    start: Pose,
    rigid: bool,
    iterations: int,
    radius_mm: float,
    tick: Callable[[int], None],
    given_start: bool,
) -> Pose:
    """Regular-step gradient descent from each of ``start``'s poses at once, each with its own
    step, over parameters that each move points by about a millimetre per unit (angles and
    matrix entries are scaled by ``radius_mm``, shifts are in millimetres), kept from level to
    level while the step restarts: from FIRST_STEP_VOXELS of the level's voxels (at most
    MAX_FIRST_TURN), or from GIVEN_START_STEP for a caller's start. (Restarted from each
    level's end instead, the parameters' scale changes between levels: a synthetic 32² pair
    then ended 4 mm off where this search ends within 0.1 mm.) ``tick`` is asked before each
    level and told of its steps after it."""
    kernel = _kernel()
    parameters = np.zeros((len(start), parameter_count(start.shift.shape[1], rigid)))
    found = start
    for level in levels:
        first = (
            GIVEN_START_STEP
            if given_start
            else min(FIRST_STEP_VOXELS * level.spacing_mm, MAX_FIRST_TURN * radius_mm)
        )
        tick(0)
        steps = Steps(iterations, first, radius_mm, RELAXATION, MIN_STEP)
        found = kernel.descend(level, start, parameters, rigid, steps)
        tick(iterations)
    return found


def _rigid_search(
    levels: list[Level],
    trial: Level | None,
    judge: Level | None,
    start: Pose,
    iterations: int,
    radius_mm: float,
    tick: Callable[[int], None],
) -> Pose:
    """The rigid search from ``start``, its half-turns and, where the trials on ``trial`` find
    turned starts, from those, all at once: the pose highest on ``judge`` (the start's on a
    tie). Without a ``trial`` and a ``judge`` (a small image) from ``start`` alone. The searches
    report their steps (``tick``); the trials' count for nothing."""
    if trial is None or judge is None:
        return _search(levels, start, True, iterations, radius_mm, tick, False)
    turned = _turned_starts(trial, start, radius_mm, tick)
    starts = [start, *([] if turned is None else [turned]), _half_turns(start)]
    found = _search(levels, Pose.joined(*starts), True, iterations, radius_mm, tick, False)
    best = int(np.argmax(_kernel().similarity(judge, found)))
    return found.picked([best])


def _turned_starts(
    level: Level, start: Pose, radius_mm: float, tick: Callable[[int], None]
) -> Pose | None:
    """The TURN_CANDIDATES turns of ``start`` (one pose) whose few rigid steps reach the
    highest similarity, TURN_MARGIN above those from ``start`` itself, with each one's turn the
    other way, and each turned on while that gains TURN_MARGIN more (MAX_TURNS turns in all),
    every pose on the way kept; None when no turn gains it."""

    def reached(poses: Pose) -> np.ndarray:
        found = _search([level], poses, True, TURN_TRIAL_STEPS, radius_mm, lambda _: tick(0), False)
        return _kernel().similarity(level, found)

    turns = _turned(start)
    values = reached(Pose.joined(start, turns))
    above, values = values[0] + TURN_MARGIN, values[1:]
    order = np.argsort(-values, kind="stable")[:TURN_CANDIDATES]
    order = order[values[order] > above]
    if len(order) == 0:
        return None
    # Each the other way about its axis too (_turned pairs them): the trials confuse the two.
    order = np.concatenate([order, np.setdiff1d(order ^ 1, order)])
    best, best_values = turns.picked(order), values[order]
    starts = best
    for _ in range(MAX_TURNS - 1):
        turns = _turned(best)
        values = reached(turns).reshape(len(order), -1)
        chosen = values.argmax(axis=1)
        gains = values[np.arange(len(order)), chosen]
        turn_on = gains > best_values + TURN_MARGIN
        if not turn_on.any():
            break
        # Indices into (turns, best): each candidate's best turn, or the candidate itself.
        candidate = np.arange(len(order))
        turned_row = candidate * values.shape[1] + chosen
        starts = Pose.joined(starts, turns.picked(turned_row[turn_on]))
        kept_row = len(turns) + candidate
        best = Pose.joined(turns, best).picked(np.where(turn_on, turned_row, kept_row))
        best_values = np.where(turn_on, gains, best_values)
    return starts


def _rotation(axis: int, angle: float, dim: int) -> np.ndarray:
    """A turn by ``angle`` radians about ``axis`` (in 2D, the plane's one turn)."""
    cos, sin = math.cos(angle), math.sin(angle)
    if dim == 2:
        return np.array([[cos, -sin], [sin, cos]])
    turn = np.eye(3)
    first, second = (axis + 1) % 3, (axis + 2) % 3
    turn[first, first] = turn[second, second] = cos
    turn[first, second], turn[second, first] = -sin, sin
    return turn


def _half_turns(start: Pose) -> Pose:
    """Each of ``start``'s poses turned half a turn about each axis (in 2D, in the plane)."""
    return _turned(start, (math.pi,))


def _turned(start: Pose, signed: Sequence[float] = SIGNED_TURNS) -> Pose:
    """Each of ``start``'s poses turned by each angle of ``signed`` (radians) about each axis
    (about the fixed image's centre; in 2D, in the plane), the turns of one pose together."""
    poses, dim = start.shift.shape
    axes = range(1 if dim == 2 else 3)
    turns = np.stack([_rotation(axis, angle, dim) for axis in axes for angle in signed])
    matrices = turns[None] @ start.matrix[:, None]
    shifts = np.broadcast_to(start.shift[:, None], (poses, len(turns), dim))
    return Pose(matrices.reshape(-1, dim, dim), shifts.reshape(-1, dim).copy())


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
    progress: ProgressCallback | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.AffineTransform:
    """The affine search over a pair's working copies, fixed → moving points.

    ``iterations`` steps at each level at most. ``initial_transform`` (linear) replaces the
    moments initialisation, the turned starts and the rigid search when given. On the CPU
    whatever a run's device: a level's descent takes milliseconds there.
    """
    fixed = copies.images[0]
    dim = fixed.GetDimension()
    rigid_mm, affine_mm = copies.rigid_mm, copies.affine_mm
    centre = np.asarray(
        fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    )
    levels = Levels(copies, centre, seed)
    given_start = initial_transform is not None
    first = initial_transform if given_start else copies.moments()
    total = iterations * (len(affine_mm) + (0 if given_start else len(rigid_mm)))
    done = 0

    def tick(steps: int) -> None:
        """Cancelled? Then ``steps`` more of the searches' steps done."""
        nonlocal done
        stop_if_cancelled(is_cancelled, "during the affine stage")
        done += steps
        if steps and progress is not None:
            progress(min(done / total, 1.0), "affine")

    start = _pose(recentred(to_affine(first, dim), centre))
    radius_mm = float(np.linalg.norm(Grid.of(fixed).extent_mm)) / 4.0
    if not given_start:
        rigid_levels = [levels.at(mm) for mm in rigid_mm]
        trial = judge = None
        if not is_small(fixed):  # each with a generator of its own: the searches' samples stay
            trial = levels.at(rigid_mm[0], TURN_TRIAL_SAMPLES)
            judge = levels.at(rigid_mm[-1], JUDGE_SAMPLES)
        start = _rigid_search(rigid_levels, trial, judge, start, iterations, radius_mm, tick)
    affine_levels = [levels.at(mm) for mm in affine_mm]
    start = _search(affine_levels, start, False, iterations, radius_mm, tick, given_start)
    return to_affine(_transform(start, centre), dim)


def _pose(transform: sitk.AffineTransform) -> Pose:
    dim = transform.GetDimension()
    matrix = np.asarray(transform.GetMatrix(), dtype=np.float64).reshape(dim, dim)
    return Pose(matrix[None], np.asarray(transform.GetTranslation(), dtype=np.float64)[None])


def _transform(pose: Pose, centre: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(len(centre))
    transform.SetCenter(tuple(float(c) for c in centre))
    transform.SetMatrix(tuple(pose.matrix[0].ravel()))
    transform.SetTranslation(tuple(pose.shift[0]))
    return transform
