"""The jobs of a batch: read from a CSV or made from a template and a folder, all checked first.

Every row is checked before any work starts (files present, readable headers, 2D/3D and matching
dimensions, unique output names), and every problem is reported at once: a batch of a thousand
scans must not fail on row 812 after an hour, nor one typo at a time.
"""

from __future__ import annotations

import csv
import glob
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..imaging.colour import is_colour
from ..imaging.fileio import IMAGE_SUFFIXES, full_suffix
from ..imaging.fsl_gradients import files_beside, read_bvecs
from ..imaging.geometry import ImageHeader
from ..imaging.output_paths import stem

#: The CSV's columns: the two images, then the optional ones.
REQUIRED_COLUMNS = ("fixed", "moving")
OPTIONAL_COLUMNS = ("id", "fixed_labels", "labels", "fixed_mask", "moving_mask")
_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*$")
#: ``image:<name>`` and ``labels:<name>`` columns: more images of the moving subject (another
#: sequence, a lesion mask, a series), warped onto the fixed grid with the job's transform as
#: ``deepregister apply`` warps them, into ``<name>_warped.nii.gz`` (a name no other output
#: ends with).
_MORE_IMAGES = re.compile(r"^(image|labels):([A-Za-z0-9_][A-Za-z0-9._+-]*)$")


@dataclass(frozen=True)
class BatchJob:
    """One registration of a batch; paths are absolute strings (they travel to other hosts)."""

    id: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    labels: str | None = None  # the moving label map
    fixed_mask: str | None = None
    moving_mask: str | None = None
    more_images: tuple[tuple[str, str], ...] = ()  # (column, path): ("image:flair", "/…")

    def inputs(self) -> dict[str, str]:
        """The input files given, by column name (the report records them)."""
        given = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("id", "more_images") and getattr(self, f.name) is not None
        }
        return {**given, **dict(self.more_images)}


def more_image(column: str) -> tuple[str, bool]:
    """An ``image:<name>``/``labels:<name>`` column's output file and whether it holds labels."""
    kind, name = column.split(":", 1)
    return f"{name}_warped.nii.gz", kind == "labels"


def gradient_files(column: str, path: str) -> dict[str, str]:
    """The ``.bvec``/``.bval`` files a more image's NIfTI diffusion series brings (FSL's, as
    dcm2niix writes them beside it), turned with it into ``<name>_warped.bvec``/``.bval``;
    by key (``image:dwi.bvec``)."""
    file, labels = more_image(column)
    if labels:
        return {}
    return {f"{column}{suffix}": f"{stem(Path(file))}{suffix}" for suffix in files_beside(path)}


def read_header(path: str | os.PathLike) -> ImageHeader:
    """The header of an image file; InputError if it is missing or not an image."""
    source = Path(path)
    if not source.is_file():
        raise InputError(f"not found: {source}" if not source.exists() else f"not a file: {source}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        raise InputError(f"not an image SimpleITK reads: {source}") from None
    return ImageHeader.of(reader)


def default_ids(movings: Sequence[Path]) -> list[str]:
    """Output names from the moving images' paths below their common folder:
    ``sub-01/brainmask.nii.gz`` → ``sub-01_brainmask``; a flat folder gives the file stems."""
    if not movings:
        return []
    common = Path(os.path.commonpath([str(p.parent) for p in movings]))
    return [
        "_".join((*p.parent.relative_to(common).parts, stem(p))).replace(" ", "_") for p in movings
    ]


def _cell(row: dict[str, str | None], column: str, folder: Path) -> str | None:
    value = (row.get(column) or "").strip()
    if not value or column == "id":
        return value or None
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (folder / path).resolve())


def jobs_from_csv(path: str | os.PathLike) -> list[BatchJob]:
    """Jobs from a CSV with a header row; relative paths are relative to the CSV's folder."""
    source = Path(path)
    try:
        with source.open(newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise InputError(f"cannot read the jobs file {source}: {error}") from None
    _check_columns(source, columns)
    if not rows:
        raise InputError(f"the jobs file {source} has a header but no jobs")
    folder = source.resolve().parent
    values = [{c: _cell(row, c, folder) for c in columns} for row in rows]
    # A row without a moving image is named after its number (and refused by check_jobs).
    names = default_ids([Path(v["moving"] or folder / f"row{n}") for n, v in enumerate(values, 1)])
    more = [c for c in columns if _MORE_IMAGES.match(c)]
    return [
        BatchJob(
            **{c: v.get(c) for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)}
            | {"id": v.get("id") or name},
            more_images=tuple((c, v[c]) for c in more if v[c] is not None),
        )
        for v, name in zip(values, names, strict=True)
    ]


def _check_columns(source: Path, columns: list[str]) -> None:
    """Refuse a header row without the required columns, with unknown ones, or with two
    ``image:``/``labels:`` columns that would write one file."""
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    known = (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS)
    unknown = [c for c in columns if c not in known and not _MORE_IMAGES.match(c)]
    if missing or unknown:
        raise InputError(
            f"the jobs file {source} "
            + (f"lacks the column(s) {', '.join(missing)}" if missing else "")
            + (" and " if missing and unknown else "")
            + (f"has unknown column(s) {', '.join(unknown)}" if unknown else "")
            + f"; its header row must name {', '.join(REQUIRED_COLUMNS)} and optionally "
            f"{', '.join(OPTIONAL_COLUMNS)}, and image:<name> or labels:<name> for more images "
            "to warp (a name of letters, digits, . _ + -)"
        )
    files: dict[str, str] = {}
    for column in filter(_MORE_IMAGES.match, columns):
        file = more_image(column)[0]
        if file in files:
            raise InputError(
                f"the jobs file {source} has columns {files[file]} and {column}, which would "
                f"both write {file}: give them different names"
            )
        files[file] = column


def jobs_from_template(
    fixed: str | os.PathLike, moving: str | os.PathLike, fixed_mask: str | os.PathLike | None
) -> list[BatchJob]:
    """Every image in a folder, or matching a glob pattern, registered to one fixed image."""
    pattern = Path(moving).expanduser()
    if pattern.is_dir():
        paths = [p for p in pattern.iterdir() if p.is_file() and full_suffix(p) in IMAGE_SUFFIXES]
    else:
        paths = [Path(p) for p in glob.glob(str(pattern), recursive=True) if Path(p).is_file()]
    paths = sorted(p.resolve() for p in paths)
    if not paths:
        raise InputError(
            f"no moving images found at {moving}: give a folder of images "
            f"({', '.join(IMAGE_SUFFIXES)}) or a glob pattern such as 'scans/*/T1.nii.gz'"
        )
    template = str(Path(fixed).expanduser().resolve())
    mask = None if fixed_mask is None else str(Path(fixed_mask).expanduser().resolve())
    return [
        BatchJob(id=name, fixed=template, moving=str(path), fixed_mask=mask)
        for path, name in zip(paths, default_ids(paths), strict=True)
        if str(path) != template
    ]


_ROLES = {
    "fixed": "fixed image",
    "moving": "moving image",
    "fixed_labels": "fixed label map",
    "labels": "moving label map",
    "fixed_mask": "fixed mask",
    "moving_mask": "moving mask",
}


def _role(column: str) -> str:
    """What a column's file is, for messages: "moving label map", "image flair"."""
    return _ROLES.get(column, column.replace(":", " "))


def _job_problems(job: BatchJob, headers: dict[str, ImageHeader | InputError]) -> list[str]:
    problems = []
    if not _SAFE_ID.match(job.id):
        problems.append(
            f"id {job.id!r} is not a usable folder name (letters, digits, . _ + - only)"
        )
    if job.fixed_labels is not None and job.labels is None:
        problems.append("fixed_labels needs labels (the moving label map) to give Dice")
    problems += [f"no {_ROLES[c]} given" for c in REQUIRED_COLUMNS if getattr(job, c) is None]
    dims = {}
    for column, path in job.inputs().items():
        header, role, more = headers[path], _role(column), column not in _ROLES
        if isinstance(header, InputError):
            problems.append(f"{role}: {header}")
        elif header.dimension not in ((2, 3, 4) if more else (2, 3)):
            allowed = "2D, 3D or a 4D series only" if more else "2D or 3D only"
            problems.append(f"{role} is {header.dimension}D ({allowed}): {path}")
        elif header.components != 1 and not more and not _picture(column, header):
            problems.append(f"{role} has {header.components} components per voxel")
        elif more and (bvecs := _bvec_problem(column, path, header)):
            problems.append(f"{role}: {bvecs}")
        else:
            dims[column] = header.dimension
    reference = dims.get("fixed", dims.get("moving"))
    for column, dim in dims.items():
        series = column not in _ROLES and (reference, dim) == (3, 4)
        if dim != reference and not series:
            problems.append(f"{_role(column)} is {dim}D but the fixed image is {reference}D")
    return problems


def _bvec_problem(column: str, path: str, header: ImageHeader) -> str | None:
    """What is wrong with the bvec file beside a more image, if it has one."""
    if not gradient_files(column, path):
        return None
    bvec = files_beside(path)[".bvec"]
    volumes = header.size[3] if header.dimension == 4 else 1
    if header.dimension != 4 or read_bvecs(bvec, np.eye(3), volumes) is None:
        return f"{bvec.name} does not hold one direction for each of its {volumes} volumes"
    return None


def _picture(column: str, header: ImageHeader) -> bool:
    """A colour fixed or moving picture, which the engine registers on its luminance."""
    return column in ("fixed", "moving") and is_colour(header)


def check_jobs(jobs: Iterable[BatchJob]) -> dict[str, ImageHeader]:
    """Every file's header; InputError listing every unusable row if there is any."""
    jobs = list(jobs)
    headers: dict[str, ImageHeader | InputError] = {}
    for job in jobs:
        for path in job.inputs().values():
            if path not in headers:
                try:
                    headers[path] = read_header(path)
                except InputError as error:
                    headers[path] = error
    problems, bad_rows = [], 0
    seen: dict[str, int] = {}
    for number, job in enumerate(jobs, start=1):
        found = _job_problems(job, headers)
        if job.id in seen:
            found.append(f"id {job.id!r} is also row {seen[job.id]}'s: add an id column")
        seen.setdefault(job.id, number)
        bad_rows += bool(found)
        problems += [f"row {number} ({job.id}): {problem}" for problem in found]
    if problems:
        raise InputError(
            f"{bad_rows} of {len(jobs)} job(s) cannot be run, so nothing was started:\n  "
            + "\n  ".join(problems)
        )
    return {path: header for path, header in headers.items() if isinstance(header, ImageHeader)}
