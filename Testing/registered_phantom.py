"""A phantom pair registered once by the command line, with every file ``register`` writes
that ``deepregister apply``'s tests compare against (the ``registered`` fixture of conftest),
and the helpers those tests share."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair


def array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def apply(*argv: object) -> int:
    return cli.main(["apply", *map(str, argv)])


def registered_files(folder: Path) -> dict[str, Path]:
    """A 3D phantom pair (the moving scan 16-bit, as scanners write) registered once, with the
    warped image and labels, the transform as .h5 and as a dense field, and its inverse."""
    pair = phantom_pair(demo_grid(3, 24), amplitude_mm=3.0, rotation_deg=4.0)
    files = {name: folder / f"{name}.nii.gz" for name in ("fixed", "fixed_labels", "labels")}
    files["moving"] = folder / "moving.nrrd"
    sitk.WriteImage(pair.fixed, str(files["fixed"]))
    sitk.WriteImage(pair.fixed_labels, str(files["fixed_labels"]))
    sitk.WriteImage(pair.moving_labels, str(files["labels"]))
    top = float(sitk.GetArrayViewFromImage(pair.moving).max())
    scan = sitk.Clamp(sitk.Round(pair.moving * (1000.0 / top)), sitk.sitkUInt16, 0, 1000)
    sitk.WriteImage(scan, str(files["moving"]))
    outputs = {
        "warped": "--warped", "warped_labels": "--warped-labels",
        "transform.h5": "--transform", "inverse.h5": "--inverse-transform",
    }  # fmt: skip
    run = ["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"])]
    run += ["--labels", str(files["labels"]), "--preset", "fast", "--iterations", "4"]
    run += ["--device", "cpu", "--quiet"]
    argv = list(run)
    for name, option in outputs.items():
        files[name] = folder / (name if "." in name else f"{name}.nii.gz")
        argv += [option, str(files[name])]
    assert cli.main(argv) == cli.EXIT_OK
    # The dense field of the same run (same seed), for the second form of --transform.
    files["transform.mha"] = folder / "transform.mha"
    assert cli.main([*run, "--transform", str(files["transform.mha"])]) == cli.EXIT_OK
    return files
