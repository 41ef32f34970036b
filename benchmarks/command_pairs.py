"""Pairs as the command line takes them: a dict of file paths per pair (``fixed``, ``moving``,
``fixed_labels``, ``moving_labels``, a ``name``), for the benchmarks that time the command a
user types (user_time.py, apply_time.py, warp_time.py)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.pairs import ordered_pairs, subjects_in


def fsdev(data: Path, count: int, image: str = "brainmask") -> list[dict[str, str]]:
    """The first ``count`` pairs of the documented order, each subject's ``image``
    (``brainmask``: the skull-stripped brain; ``T1``: the whole head)."""
    pairs = []
    for moving, fixed in ordered_pairs(subjects_in(data, image))[:count]:
        pairs.append({
            "name": f"{moving}→{fixed}",
            "fixed": str(data / fixed / f"{image}.nii.gz"),
            "moving": str(data / moving / f"{image}.nii.gz"),
            "fixed_labels": str(data / fixed / "aseg.nii.gz"),
            "moving_labels": str(data / moving / "aseg.nii.gz"),
        })  # fmt: skip
    return pairs


def phantoms(count: int, folder: Path) -> list[dict[str, str]]:
    import SimpleITK as sitk

    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    pairs = []
    for seed in range(count):
        pair = phantom_pair(demo_grid(3, 24), seed=seed)
        paths = {"name": f"phantom {seed}"}
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            paths[key] = str(folder / f"phantom{seed}-{key}.nii.gz")
            sitk.WriteImage(getattr(pair, key), paths[key])
        pairs.append(paths)
    return pairs


#: The CT-like pair of ``--ct``: memory.py's big pair, a torso CT's usual size and spacing.
CT_SHAPE, CT_SPACING = (512, 512, 600), (0.78, 0.78, 1.0)


def ct_pairs(folder: Path) -> list[dict[str, str]]:
    from benchmarks.ct_phantom import ct_pair_files

    # Tissues, not FreeSurfer's structures: Dice (27) would score labels 2 and 3 as theirs.
    paths = ct_pair_files(folder, CT_SHAPE, CT_SPACING)
    return [{"name": "CT " + "×".join(map(str, CT_SHAPE)), "structures": "tissues", **paths}]
