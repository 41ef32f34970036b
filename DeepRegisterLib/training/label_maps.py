"""Label maps to synthesise training pairs from: read, resampled, optionally aligned, cached.

The maps come from files (FreeSurfer / SynthSeg segmentations); each is resampled to the
training spacing in its own orientation and cropped to its foreground as the engine frames a
fixed image. Labels are renumbered consecutively (index 0 is background) so the synthesiser can
index tables by label.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..imaging.fileio import atomic_write_path, read_image
from ..imaging.geometry import Grid
from ..registration.affine_search import register_normalised
from ..registration.preprocessing import foreground_box, normalised_for_registration
from .intensities import FREESURFER_T1_MEANS

# Air kept around a label map's labels: room for a synthetic deformation to move them in.
LABEL_MAP_MARGIN_MM = 10.0
ALIGNED_LABEL_MAPS = "aligned-label-maps.pt"  # the CLI's cache of aligned maps, for --resume


@dataclass
class LabelMaps:
    """Label maps on an isotropic grid, cropped to their foreground, with consecutive labels.

    ``values[i]`` is the original label value of index ``i`` (index 0 is background);
    ``names`` are the source files, for the model card. ``aligned`` maps share the first map's
    grid, each affinely registered to it.
    """

    maps: list[torch.Tensor]
    values: list[int]
    spacing_mm: float
    names: list[str]
    aligned: bool = False

    @property
    def count(self) -> int:
        return len(self.values)


def load_label_maps(
    paths: Sequence[str | os.PathLike],
    spacing_mm: float,
    background_from: int | None = None,
    align: bool = False,
    progress: Callable[[str], None] | None = None,
    cache: str | os.PathLike | None = None,
) -> LabelMaps:
    """Read label maps and resample them (nearest) to ``spacing_mm`` in their own orientation.

    Each map is cropped to its foreground with the engine's margin, so training sees brains
    framed as the engine frames a fixed image. Labels ≥ ``background_from`` become background
    (SynthSeg's extra-cerebral labels are ≥ 100: dropping them gives skull-stripped anatomy).
    With ``align``, every map is registered (the engine's affine stage, on label-derived
    images) to the first and resampled onto its grid: pairs of two maps then differ as two
    subjects do after the engine's affine stage.

    ``cache`` names a file that keeps the result for the next call with the same files (by
    content) and options: aligning 20 SynthSeg maps takes minutes, and every ``--resume``
    of a training run would otherwise pay them again.
    """
    if not paths:
        raise InputError("no label maps given")
    key = _cache_key(paths, spacing_mm, background_from, align) if cache is not None else ""
    if cache is not None and (cached := _read_cache(Path(cache), key, spacing_mm, align)):
        if progress is not None:
            progress(f"label maps from {cache} (same files and options)")
        return cached
    images = [_read_label_map(path, background_from) for path in paths]
    grid = _cropped_grid(images[0], spacing_mm)
    reference = _label_image(images[0]) if align else None
    arrays = []
    for index, (path, image) in enumerate(zip(paths, images, strict=True)):
        if not align:
            grid = _cropped_grid(image, spacing_mm)
        transform = sitk.Transform()
        if reference is not None and index > 0:
            if progress is not None:
                progress(f"aligning label map {index + 1}/{len(paths)} ({Path(path).name})")
            transform = register_normalised(reference, _label_image(image))
        resampled = sitk.Resample(
            image, grid.reference_image(), transform, sitk.sitkNearestNeighbor, 0
        )
        arrays.append(sitk.GetArrayFromImage(resampled))
    values = np.unique(np.concatenate([np.unique(a) for a in arrays]))
    values = np.union1d([0], values)
    storage = torch.uint8 if len(values) <= 256 else torch.int16
    maps = [torch.from_numpy(np.searchsorted(values, a)).to(storage) for a in arrays]
    result = LabelMaps(
        maps, [int(v) for v in values], float(spacing_mm), [Path(p).name for p in paths], align
    )
    if cache is not None:
        data = {"key": key, "maps": maps, "values": result.values, "names": result.names}
        with atomic_write_path(cache) as staged:
            torch.save(data, staged)
    return result


def _cache_key(
    paths: Sequence[str | os.PathLike], spacing_mm: float, background_from: int | None, align: bool
) -> str:
    digest = hashlib.sha256(f"v1 {spacing_mm!r} {background_from!r} {align}".encode())
    for path in paths:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def _read_cache(path: Path, key: str, spacing_mm: float, align: bool) -> LabelMaps | None:
    """The cached maps if ``path`` holds them for ``key``; None (recompute) otherwise."""
    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # absent, truncated, refused by weights_only: computing again is safe
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    return LabelMaps(data["maps"], data["values"], float(spacing_mm), data["names"], align)


def _read_label_map(path: str | os.PathLike, background_from: int | None) -> sitk.Image:
    image = read_image(path, "label map")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"label map {path} is a vector image; give a scalar label map")
    labels = sitk.Cast(image, sitk.sitkInt32)
    if background_from is not None:
        labels = labels * sitk.Cast(labels < background_from, sitk.sitkInt32)
    if not sitk.GetArrayViewFromImage(labels).any():
        raise InputError(f"label map {path} has no non-zero labels")
    return labels


def _cropped_grid(labels: sitk.Image, spacing_mm: float) -> Grid:
    lower, upper = foreground_box(labels, sitk.GetArrayViewFromImage(labels), LABEL_MAP_MARGIN_MM)
    return Grid.of(labels).with_spacing_cropped_to(spacing_mm, lower, upper, multiple=1)


def _label_image(labels: sitk.Image) -> sitk.Image:
    """An image to register label maps by (normalised for the affine stage): T1-like values for
    FreeSurfer labels, and a fixed value per label otherwise, so any two maps in one label
    convention look alike."""
    array = sitk.GetArrayViewFromImage(labels)
    values, inverse = np.unique(array, return_inverse=True)
    golden = 0.6180339887
    intensity = np.array(
        [FREESURFER_T1_MEANS.get(int(v), 0.2 + 0.7 * ((int(v) * golden) % 1.0)) for v in values],
        dtype=np.float32,
    )
    intensity[values == 0] = 0.0
    image = sitk.GetImageFromArray(intensity[inverse].reshape(array.shape))
    image.CopyInformation(labels)
    return normalised_for_registration(image)
