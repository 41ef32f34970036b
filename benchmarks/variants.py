"""The variants of a benchmark run's pairs that its options ask for (whole heads, 2D slices,
negatives, turns, slabs): the pairs themselves, and what the report says of each."""

from __future__ import annotations

import argparse
from pathlib import Path

from .pairs import fsdev_pairs, negative, prepare_2d, slab, smoke_pairs, turned
from .tasks import PairSpec


def variant_pairs(args: argparse.Namespace, folder: Path) -> list[PairSpec]:
    """The run's pairs, each variant applied in turn, their files written in ``folder``."""
    if args.smoke:
        pairs = smoke_pairs(args.pairs or 2, folder, args.cross_contrast)
    else:
        pairs = fsdev_pairs(
            Path(args.data), args.pairs, folder, args.cross_contrast, args.skip,
            image="T1" if args.heads else "brainmask",
        )  # fmt: skip
    if args.two_d:
        print(f"preparing {len(pairs)} matched axial slice pair(s) (3D affine first)…")
        pairs = [prepare_2d(p, folder) for p in pairs]
    if args.negative:
        pairs = [negative(p, folder) for p in pairs]
    if args.turn:
        pairs = [turned(p, folder, args.turn, i % 3) for i, p in enumerate(pairs)]
    if args.slab:
        pairs = [slab(p, folder, args.slab) for p in pairs]
    return pairs


def variant_notes(args: argparse.Namespace) -> list[str]:
    """A note for the report on each variant the run asked for."""
    notes = []
    if args.negative:
        notes.append(
            "Every image ran as its negative (max − v): dark anatomy on a bright background."
        )
    if args.turn:
        notes.append(f"Every moving image and its labels were turned {args.turn:g}° (--turn).")
    if args.heads:
        notes.append(
            "Whole-head T1 images (--heads: skull, scalp and neck), of the subjects that have "
            "one; Dice over the same structures, det J inside the fixed brain mask."
        )
    if args.slab:
        notes.append(
            f"Every moving image was cut to a {args.slab:g} mm slab through its middle (--slab); "
            "its labels stayed whole, so Dice also scores the field beyond the slab."
        )
    return notes
