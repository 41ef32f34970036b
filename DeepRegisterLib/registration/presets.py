"""Named trade-offs between time and accuracy, as data rather than branches in the engine."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import InputError


@dataclass(frozen=True)
class Level:
    """One instance-optimisation level: grid spacing (mm), Adam steps, integration steps, the
    spacing of the control grid the velocity lives on (coarser is faster, finer sharper),
    how many of the last squarings autograd follows (None: all; fewer is faster, see
    ``integrate_velocity``), and whether a control grid coarser than the velocity it is given
    hands on its change added to that velocity (keeping the network's finer detail) rather
    than its own, coarser field."""

    spacing_mm: float
    iterations: int
    integration_steps: int = 6
    control_mm: float = 4.0
    differentiated_squarings: int | None = None
    adds_change: bool = False


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    affine_iterations: int  # gradient steps at each of the affine stage's levels, at most
    levels: tuple[Level, ...]
    # The affine stage's finest level: 4 mm matched 2 mm's Dice after `balanced` on ten fs-dev
    # pairs (0.837 against 0.836) in a third of the stage's time.
    affine_finest_mm: float = 4.0
    regularization: float = 1.0
    learning_rate: float = 0.5
    window: int = 5  # local NCC window, voxels at each level
    # MIND's patch, voxels at each level: at 4 mm a 5-voxel patch (20 mm) averages away the
    # structure its descriptor should describe.
    mind_window: int = 3
    # Weight of regularizers.folding_penalty. A 2 mm control grid folded up to 0.09 % of the brain
    # on fs-dev pairs without it (`accurate`, 120 steps).
    folding_weight: float = 10.0
    # The det J that penalty keeps the control grid above. Folds are counted at 1 mm, between
    # the 2 mm nodes, where the trilinear field can turn more sharply than the nodes' central
    # differences show: `accurate` folded 1–7 voxels on 12 of the 20 fs-dev pairs with 0.05.
    folding_margin: float = 0.05
    # At most this many recursive network passes (None: as many as the model asks). A second
    # pass lifts the network alone (brain3d stage 2: 0.751 → 0.768), not always what refines it.
    network_passes: int | None = None
    # Each 3D pass as the mean of both orders (fixed, moving) and (moving, fixed), or the first
    # alone. Refined by `fast`'s 30 steps, one order scored the same mean Dice on the 20 fs-dev
    # pairs (0.8315 both, better on 12) in half the network's time. 2D passes always take both
    # orders: they cost milliseconds, and one order scored lower on the 20 slice pairs (0.722
    # against 0.724).
    symmetric_network_in_3d: bool = True
    # How far the deformable grid reaches past the fixed foreground (training crops its real
    # pairs the same way). 5 mm, not the 10 of earlier rounds: the 2 mm level tapers the field
    # to zero over two voxels, which stay off the anatomy. On the 20 fs-dev pairs (affine
    # cached) `fast` scored 0.83236 against 10 mm's 0.83237 (better on 10), no fold, in 11 % less
    # optimisation; 2 mm lost 0.0002. `balanced` folded 10 voxels on one pair at 5 mm, between
    # the 2 mm nodes (not at the border), and none with a folding margin of 0.1: 0.83869
    # against 0.83849 (better on 13). `accurate` folded on three pairs (1–3 voxels) at 5 mm,
    # and none with a folding margin of 0.3 (below).
    foreground_margin_mm: float = 5.0

    def summary(self) -> str:
        """``20 steps at 4 mm, 10 steps at 2 mm, at most 1 network pass (one-sided in 3D):
        <description>``, read off the settings."""
        parts = [f"{level.iterations} steps at {level.spacing_mm:g} mm" for level in self.levels]
        if self.network_passes is not None:
            plural = "" if self.network_passes == 1 else "es"
            sided = "" if self.symmetric_network_in_3d else " (one-sided in 3D)"
            parts.append(f"at most {self.network_passes} network pass{plural}{sided}")
        return f"{', '.join(parts)}: {self.description}"

    def window_for(self, similarity: str) -> int:
        return self.mind_window if similarity == "mind" else self.window

    def with_iterations(self, iterations: int) -> Preset:
        """The same levels with ``iterations`` Adam steps split over them (coarse first)."""
        if iterations < 0:
            raise InputError(f"iterations must be ≥ 0, got {iterations}")
        total = sum(level.iterations for level in self.levels) or 1
        levels = tuple(
            replace(level, iterations=round(iterations * level.iterations / total))
            for level in self.levels
        )
        return replace(self, levels=levels)


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        # Each ends on a 2 mm control grid, the network's own: a coarser one re-smooths the
        # network's field. With one 4 mm level `fast` beat the network alone on 11 of 20 fs-dev
        # pairs; ending at 2 mm it does on 20 of 20 (0.831 against 0.800, 1.7× the time).
        # `fast` squares 4 then 3 times, not 5 and 6: on six fs-dev pairs 4 and 4 scored 0.8211
        # against 0.8205 Dice, and on twenty 4 and 3 0.8315 against 4 and 4's 0.8315 (better
        # on 14), the 2 mm optimisation 12 % faster: integration is most of a step's sampling.
        # Six 2 mm steps instead of ten lost Dice on all twenty (0.8258).
        # `balanced` squared 4 and 4 times, not 5 and 6 (now 4 and 3, below): 0.8387 against
        # 0.8384 (better on 14), no fold, and a 2 mm step samples 5 times instead of 7. 5 and 4
        # scored 0.8383 (better on 8), 5 and 3 0.8383 (on 7); `fast` with 4 and 2 lost on 13 of 17.
        # `fast` and `balanced` differentiate the last 2 squarings of a step. On the twenty,
        # `fast` scored 0.8315 against 0.8316 with all (better on 10), no fold, in 17 % less
        # optimisation; following the last one alone lost 0.0012 on eight. `balanced` scored
        # 0.8386 against 0.8384 (better on 12) in 26 % less, but folded 1 to 3 voxels on three
        # pairs, where it folded 1 on one: with a folding weight of 30, 0.8386 and 1 voxel on
        # one. `accurate` with 2 and a weight of 10 folded on six of six pairs, against four
        # following all; with a weight of 30 on two (below).
        # `fast`'s 4 mm level adds its change to the network's velocity: on the twenty pairs
        # 0.8324 against 0.8317 (better on 13), no fold; slices 0.721 against 0.718. It did
        # not let the 2 mm level stop sooner (8 steps: 0.8299). In `balanced` it scored 0.8388
        # against 0.8382 but folded 1–8 voxels on three pairs, which a folding weight of 60
        # did not prevent.
        Preset(
            "fast",
            "about 5 s for a 1 mm brain on two CPU threads, start to files",
            affine_iterations=30,
            levels=(
                Level(4.0, 20, 4, differentiated_squarings=2, adds_change=True),
                Level(2.0, 10, 3, control_mm=2.0, differentiated_squarings=2),
            ),
            network_passes=1,
            symmetric_network_in_3d=False,
        ),
        # `balanced` runs one network pass with a folding weight of 200: on the twenty pairs
        # 0.8384 against two passes' 0.8382 (better on 12), no fold, the network stage about
        # half as long. One pass with a weight of 60 folded 3 voxels on one pair. In one order
        # (one-sided) too: 0.8384 again (better on 11), no fold, the network 0.79 → 0.48 s.
        # Its 2 mm level squares 3 times, as `fast`'s: 0.8385 against 4's 0.8384 (better on
        # 10), no fold, a step sampling 4 times instead of 5.
        Preset(
            "balanced",
            "about 9 s for a 1 mm brain on two CPU threads, start to files",
            affine_iterations=50,
            levels=(
                Level(4.0, 50, 4, differentiated_squarings=2),
                Level(2.0, 30, 3, control_mm=2.0, differentiated_squarings=2),
            ),
            folding_weight=200.0,
            folding_margin=0.1,
            network_passes=1,
            symmetric_network_in_3d=False,
        ),
        Preset(
            "accurate",
            "about 20 s for a 1 mm brain on two CPU threads, for the best overlap",
            affine_iterations=75,
            # 4 and 4 squaring steps (first 5 and 7, then 4 and 5): on the twenty fs-dev pairs
            # 4 and 4 scored 0.8409 Dice (27) as 4 and 5 did (−0.00006, better on 9), in 13 %
            # less optimisation. Following the last 2 squarings with a folding weight of 30,
            # on the first six pairs: 0.8415 against 0.8413 (better on 3), folding on two pairs
            # instead of three (at most 8 × 10⁻⁵ %), in about a quarter less optimisation.
            # 80 steps at 2 mm, not 120: on the twenty pairs 0.8408 against 0.8411 (better on
            # 4; 100 steps 0.8409), folding on 12 pairs instead of 13 (at most 4 × 10⁻⁵ %), in
            # about 30 % less optimisation: each 20 steps there buy about 0.0002. 60 steps at
            # 4 mm instead of 80 lost 0.0001 more for little time (4 mm steps are cheap).
            # A folding margin of 0.2: on the twenty pairs no fold, where 0.05 folded 1–7
            # voxels on 12, for 0.84035 against 0.84076 Dice (better on 7). 0.15 folded 3
            # voxels on one pair (0.84046); a weight of 200 at 0.05 still folded on 10.
            # Since its grid reaches 5 mm past the foreground, not 10, a margin of 0.3: on the
            # twenty 0.84013 against 10 mm's 0.84035 (better on 9), no fold, in a quarter less
            # optimisation (20.4 → 15.5 s). At 0.2 it folded 1–3 voxels on three pairs, at 0.25
            # one voxel on two, and at 0.2 with a weight of 100 2–3 voxels on two. With the
            # compiled affine search (another sample of voxels, 2026-12-07) 0.3 folded 1 and 2
            # voxels on two pairs; 0.4 none, for 0.8387 against 0.8392 (3-decimal Dice).
            levels=(
                Level(4.0, 80, 4, differentiated_squarings=2),
                Level(2.0, 80, 4, control_mm=2.0, differentiated_squarings=2),
            ),
            folding_weight=30.0,
            folding_margin=0.4,
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
