"""A registration in a child process, so that Slicer's main thread never starves it.

Inside the Slicer application the main thread holds Python's GIL while Qt idles, so a Python
worker thread runs only in the gaps (the demo registration took 103 s instead of 4.4 s). The
child is the library's own command line, run by Slicer's interpreter and usually started before
the job (:mod:`.child_process`). The job's inputs go to the child's private temporary folder as
uncompressed MetaImage (.mha: exact voxels and geometry; NRRD stores direction × spacing and
reads an oblique direction back 1 ulp off), the settings as JSON; progress comes back as the JSON
lines the child writes to a file in that folder, which :meth:`RegistrationProcess.poll` reads
from the main thread without blocking. No Python thread of ours is involved, and a starved reader
can never stall the child (as a full pipe would); the outputs come back as files and are pushed
on the main thread, all or nothing. The folder is removed whatever the outcome. Use from the
main thread::

    process = RegistrationProcess(job).start()
    while process.running:          # a QTimer slot in the module
        for fraction, message in process.poll(): ...
    nodes = process.push()          # or process.cancel() at any time
"""

from __future__ import annotations

import atexit
import json
import shutil
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import SimpleITK as sitk
import slicer

from ..cli.exit_codes import EXIT_INPUT, EXIT_MEMORY
from ..errors import DeepRegisterError, InputError, RegistrationCancelled, ResourceError
from ..imaging.fileio import read_transform
from ..imaging.geometry import Grid
from .api import RegistrationJob
from .child_process import PROGRESS_FILE, STDERR_FILE, ChildProcess, takeChild
from .push import RegistrationNodes


def childPython() -> str:
    """Slicer's own interpreter (PythonSlicer) inside Slicer; this interpreter outside."""
    insideSlicer = hasattr(slicer, "app")  # slicer-core has no application
    return (shutil.which("PythonSlicer") if insideSlicer else None) or sys.executable


@dataclass
class ProcessOutputs:
    """What the child wrote, read back: what a push needs of a RegistrationResult."""

    fixed_grid: Grid
    affine: sitk.Transform
    deformation: sitk.Image  # v on the network grid: the transform is [affine, v]
    warped: sitk.Image | None  # None unless a volume node receives it
    warped_labels: dict[str, sitk.Image] = field(default_factory=dict)
    jacobian: sitk.Image | None = None
    inverse_deformation: sitk.Image | None = None  # w: the inverse is [w, affine⁻¹]
    report: dict[str, Any] = field(default_factory=dict)


class RegistrationProcess:
    """One registration job run by ``python -m DeepRegisterLib register`` in a child process."""

    def __init__(self, job: RegistrationJob, python: str | None = None):
        self.job = job
        self.python = python or childPython()
        self.cancelRequested = False
        self._child: ChildProcess | None = None
        self._progress: BinaryIO | None = None  # the child's stdout, read from where poll left off
        self._partialLine = b""
        self._drained = False  # the child has ended and poll() has read all it wrote
        self._labelFiles = {key: f"labels{i}.mha" for i, key in enumerate(job.labelImages)}

    def start(self) -> RegistrationProcess:
        """Write the inputs and hand them to a child (the waiting one, if any); returns at once."""
        self._child = child = takeChild(self.python)
        try:
            child.run(self._writeInputs(child.folder))
            self._progress = open(child.folder / PROGRESS_FILE, "rb")  # noqa: SIM115 (_cleanUp)
        except BaseException:
            self._cleanUp()
            raise
        atexit.register(self.cancel)  # closing Slicer ends the child too
        return self

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.process.pid

    @property
    def running(self) -> bool:
        """True until the child has ended and :meth:`poll` has returned all it wrote."""
        return self._child is not None and not self._drained

    def poll(self) -> list[tuple[float, str]]:
        """The (fraction, message) pairs the child wrote since the last call, in order; never
        blocks."""
        if self._progress is None or self._drained:
            return []
        # Asked first: what follows then reads all the child wrote.
        ended = self._child.process.poll() is not None
        lines = (self._partialLine + self._progress.read()).split(b"\n")
        self._partialLine = lines.pop()  # a line the child is still writing
        self._drained = ended
        return [event for event in map(_progressEvent, lines) if event is not None]

    def cancel(self) -> None:
        """End the child (terminate, then kill after a grace period) and remove its files."""
        self.cancelRequested = True
        self._drained = True
        self._cleanUp()

    def finish(self) -> ProcessOutputs:
        """Once the child has ended: its outputs, or its error raised (InputError for unusable
        input, ResourceError for memory); the temporary folder is removed either way."""
        if self.running:
            raise RuntimeError("the registration is still running")
        try:
            if self.cancelRequested or self._child is None:
                raise RegistrationCancelled("registration cancelled; the scene is unchanged")
            if self._child.process.returncode != 0:
                raise _childError(self._child.process.returncode, self._child.folder / STDERR_FILE)
            return self._readOutputs(self._child.folder / "out")
        finally:
            self._cleanUp()

    def push(self) -> RegistrationNodes:
        """:meth:`finish`, then the outputs pushed into the scene (main thread, all or nothing)."""
        return self.job.push(self.finish())

    def _writeInputs(self, folder: Path) -> list[str]:
        """The inputs written into ``folder``; the child's command line for them."""
        job, out = self.job, folder / "out"
        out.mkdir()

        def written(image: sitk.Image, name: str) -> str:
            path = folder / name
            sitk.WriteImage(image, str(path), False)  # uncompressed: fast, lossless
            return str(path)

        (folder / "settings.json").write_text(json.dumps(job.settings.to_dict()), "utf-8")
        command = [
            "register",
            "--fixed", written(job.fixed, "fixed.mha"),
            "--moving", written(job.moving, "moving.mha"),
            "--settings", str(folder / "settings.json"), "--progress", "json", "--uncompressed",
            "--transform", str(out / "transform.h5"),
            "--report", str(out / "report.json"),
        ]  # fmt: skip
        if job.settings.compute_warped:
            command += ["--warped", str(out / "warped.mha")]
        if job.fixedMask is not None:
            command += ["--fixed-mask", written(job.fixedMask, "fixed-mask.mha")]
        if job.movingMask is not None:
            command += ["--moving-mask", written(job.movingMask, "moving-mask.mha")]
        if job.initialTransform is not None:
            sitk.WriteTransform(job.initialTransform, str(folder / "initial.h5"))
            command += ["--initial-transform", str(folder / "initial.h5")]
        if self._labelFiles:
            names = self._labelFiles.values()
            command += ["--labels", *map(written, job.labelImages.values(), names)]
            command += ["--warped-labels", *(str(out / name) for name in names)]
        if job.settings.compute_jacobian:
            command += ["--jacobian", str(out / "jacobian.mha")]
        if job.settings.compute_inverse:
            command += ["--inverse-transform", str(out / "inverse.h5")]  # [w, affine⁻¹]
        return command

    def _readOutputs(self, out: Path) -> ProcessOutputs:
        """The child's files read back (the transform and the images it wrote)."""
        names = ["warped.mha", "jacobian.mha", *self._labelFiles.values()]
        transforms, images = readChildFiles(out, names)
        affine, deformation = _parts(transforms["transform.h5"], fieldAt=1)
        inverse = transforms.get("inverse.h5")
        return ProcessOutputs(
            fixed_grid=Grid.of(self.job.fixed),
            affine=affine,
            deformation=deformation,
            warped=images.get("warped.mha"),
            warped_labels={key: images.get(name) for key, name in self._labelFiles.items()},
            jacobian=images.get("jacobian.mha"),
            inverse_deformation=None if inverse is None else _parts(inverse, fieldAt=0)[1],
            report=json.loads((out / "report.json").read_text("utf-8")),
        )

    def _cleanUp(self) -> None:
        atexit.unregister(self.cancel)
        if self._progress is not None:
            self._progress.close()
        if self._child is not None:
            self._child.end()


def readChildFiles(
    out: Path, imageNames: Sequence[str]
) -> tuple[dict[str, sitk.Transform], dict[str, sitk.Image]]:
    """``transform.h5`` (and ``inverse.h5``, if there) and those of the MetaImage files
    ``imageNames`` that ``out`` holds.

    The images are read side by side (ITK reads without the GIL, and Slicer's main thread
    waits for this) while this thread reads the transforms. The images are read as MetaImage by
    name: ITK otherwise asks its HDF5 reader whether it can read each one, and that call beside
    a transform's HDF5 read failed or corrupted memory.
    """
    if not (out / "transform.h5").exists():
        raise DeepRegisterError("the registration process ended without writing its result")
    present = [name for name in imageNames if (out / name).exists()]
    with ThreadPoolExecutor(max(1, len(present))) as pool:
        read = pool.map(
            lambda name: sitk.ReadImage(str(out / name), imageIO="MetaImageIO"), present
        )
        transforms = {
            name: read_transform(out / name)
            for name in ("transform.h5", "inverse.h5")
            if (out / name).exists()
        }
        return transforms, dict(zip(present, read, strict=True))


def _parts(transform: sitk.Transform, fieldAt: int) -> tuple[sitk.Transform, sitk.Image]:
    """The linear part and the field of a composite the child wrote: ``[affine, v]`` (the
    field at 1) or ``[w, affine⁻¹]`` (the field at 0)."""
    parts = transform.Downcast()
    if not isinstance(parts, sitk.CompositeTransform) or parts.GetNumberOfTransforms() != 2:
        raise DeepRegisterError("the registration process wrote an unexpected transform")
    linear = parts.GetNthTransform(1 - fieldAt).Downcast()
    return linear, parts.GetNthTransform(fieldAt).Downcast().GetDisplacementField()


def _progressEvent(line: bytes) -> tuple[float, str] | None:
    """(fraction, message) of a progress line; None for any other line (the final "done"
    event, or a library printing to stdout)."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") != "progress":
        return None
    return float(event["fraction"]), str(event["message"])


def _childError(returnCode: int, stderrPath: Path) -> Exception:
    """The child's failure as the error the in-process path would raise, with its message."""
    lines = [line.strip() for line in _text(stderrPath).splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    for prefix in ("deepregister: error: ", "deepregister: not enough memory: "):
        last = last.removeprefix(prefix)
    if returnCode == EXIT_INPUT:
        return InputError(last or "the registration refused its inputs")
    if returnCode == EXIT_MEMORY:
        return ResourceError(last or "not enough memory for this registration")
    how = f"was killed by signal {-returnCode}" if returnCode < 0 else f"exited with {returnCode}"
    detail = f": {last}" if last else ""
    return DeepRegisterError(f"the registration process {how}{detail}; the scene is unchanged")


def _text(path: Path) -> str:
    try:
        return path.read_text("utf-8", errors="replace")
    except OSError:
        return ""
