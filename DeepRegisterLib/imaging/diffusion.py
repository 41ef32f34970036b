"""A diffusion-weighted NRRD's gradient table, carried through a transform.

Slicer (and DTIPrep, UKF, teem) keep a DWI's gradient directions in its NRRD header: a key per
direction, in a "measurement frame" given in the file's space (RAS or LPS). ITK reads the keys
but hands the frame to no one, so it is read from the header text here. The directions are
turned by the rotation of the transform's best-fitting affine, as FSL's and ANTs' tools rotate
bvecs (the finite-strain rotation: the deformation's local turns are not applied), and written
in LPS with the measurement frame spelled out: Slicer reads a file without one as RAS, the
NRRD format as the file's own space, and an explicit frame leaves no reader guessing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .geometry import Grid, nearest_rotation

GRADIENT_KEY = "DWMRI_gradient_"
#: NRRD's name for each space whose axes are anatomical, and the signs that bring its
#: coordinates to LPS.
_SPACES = {
    "right-anterior-superior": (-1, -1, 1), "ras": (-1, -1, 1),
    "left-anterior-superior": (1, -1, 1), "las": (1, -1, 1),
    "left-posterior-superior": (1, 1, 1), "lps": (1, 1, 1),
}  # fmt: skip
#: The header field written beside the rotated directions, which are in LPS.
LPS_FRAME = {"measurement frame": "(1,0,0) (0,1,0) (0,0,1)"}
_LATTICE = 8  # reference points a side for the affine fit: 512, a millisecond of ITK


@dataclass(frozen=True)
class GradientTable:
    """The header's diffusion keys, each direction in LPS (its length, a b-value's scale)."""

    keys: dict[str, str]  # every DWMRI_ key but the directions (b-value, NEX), and modality
    directions: np.ndarray  # (n, 3)


def is_diffusion(image: sitk.Image) -> bool:
    return any(key.startswith(GRADIENT_KEY) for key in image.GetMetaDataKeys())


def read_gradient_table(path: str | os.PathLike, image: sitk.Image) -> GradientTable | None:
    """The table of ``image`` read from ``path``; None when the header cannot say what frame
    its directions are in (a non-anatomical space, a B-matrix instead of directions)."""
    names = sorted(key for key in image.GetMetaDataKeys() if key.startswith(GRADIENT_KEY))
    fields = _nrrd_fields(Path(path))
    signs = _SPACES.get(fields.get("space", "").strip().lower())
    if signs is None or not names:
        return None
    vectors = np.array([[float(v) for v in image.GetMetaData(name).split()] for name in names])
    frame = np.eye(3)
    if "measurement frame" in fields:  # its vectors are the columns, in the space's axes
        columns = re.findall(r"\(([^)]*)\)", fields["measurement frame"])
        frame = np.array([[float(v) for v in column.split(",")] for column in columns]).T
    kept = {
        key: image.GetMetaData(key) for key in image.GetMetaDataKeys()
        if key == "modality" or (key.startswith("DWMRI_") and not key.startswith(GRADIENT_KEY))
    }  # fmt: skip
    return GradientTable(kept, (np.diag(signs) @ frame @ vectors.T).T)


def transform_rotation(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    """The rotation (LPS, reference → image) of the affine that best fits ``transform`` over
    the reference grid: the proper-rotation factor of its matrix's polar decomposition."""
    axes = [np.linspace(0, n - 1, _LATTICE) for n in grid.size]
    indices = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, grid.dim)
    reference = grid.reference_image()
    points = np.array([reference.TransformContinuousIndexToPhysicalPoint(i) for i in indices])
    mapped = np.array([transform.TransformPoint(p) for p in points])
    design = np.hstack([points, np.ones((len(points), 1))])
    return nearest_rotation(np.linalg.lstsq(design, mapped, rcond=None)[0][:3].T)


def gradient_keys(table: GradientTable, rotation: np.ndarray) -> dict[str, str]:
    """``table``'s header keys for the warped image, each direction turned from the image's
    space into the reference's (the inverse of ``rotation``); the file also needs
    :data:`LPS_FRAME` in its header."""
    turned = table.directions @ rotation  # Rᵀ g for each row g
    directions = {
        f"{GRADIENT_KEY}{n:04d}": " ".join(f"{v:.9g}" for v in direction)
        for n, direction in enumerate(turned)
    }
    return {**table.keys, **directions}


def _nrrd_fields(path: Path) -> dict[str, str]:
    """The ``field: value`` lines of an NRRD header (``key:=value`` pairs are ITK's to read)."""
    if path.suffix.lower() not in (".nrrd", ".nhdr"):
        return {}
    fields = {}
    with path.open("rb") as header:
        for line in iter(header.readline, b""):
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                break  # the data of an attached file begins
            if ": " in text and ":=" not in text and not text.startswith("#"):
                name, value = text.split(": ", 1)
                fields[name.strip().lower()] = value
    return fields
