"""A command line run stopped by a cancel request, Ctrl-C or SIGKILL, at any moment, leaves
no output under an output's name: exit 130 and nothing written, or the earlier file kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import bent_pair

from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.registration import engine

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def a_2d_pair() -> tuple[sitk.Image, sitk.Image]:
    return bent_pair(2, (32, 28))


@pytest.fixture
def a_2d_pair_on_disk(a_2d_pair, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "inputs"
    folder.mkdir()
    paths = folder / "fixed.nii.gz", folder / "moving.nii.gz"
    for image, path in zip(a_2d_pair, paths, strict=True):
        sitk.WriteImage(image, str(path))
    return paths


def listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir()}


def register_arguments(inputs: tuple[Path, Path], out: Path) -> list[str]:
    return [
        "register", "--fixed", str(inputs[0]), "--moving", str(inputs[1]),
        "--warped", str(out / "warped.nii.gz"), "--transform", str(out / "transform.h5"),
        "--jacobian", str(out / "jacobian.nii.gz"), "--report", str(out / "report.json"),
        "--preset", "fast", "--model", "none", "--device", "cpu", "--iterations", "6",
    ]  # fmt: skip


@pytest.fixture
def an_output_folder(tmp_path: Path) -> Path:
    """An output folder that already holds a file of the same name as an output."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "transform.h5").write_bytes(b"an earlier result")
    (folder / "notes.txt").write_text("keep me")
    return folder


def test_a_cancelled_cli_run_exits_130_and_writes_nothing(
    a_2d_pair_on_disk, an_output_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    real_register = engine.register

    def cancelled_mid_run(*args, progress=None, cancel=None, **kwargs):
        def progress_then_cancel(fraction: float, message: str) -> None:
            progress(fraction, message)
            if message.startswith("optimising"):
                helper = threading.Thread(target=cancel.set)
                helper.start()
                helper.join()

        return real_register(*args, progress=progress_then_cancel, cancel=cancel, **kwargs)

    monkeypatch.setattr(engine, "register", cancelled_mid_run)
    before = listing(an_output_folder)
    code = cli.main(register_arguments(a_2d_pair_on_disk, an_output_folder))
    assert code == cli.EXIT_INTERRUPTED == 130
    assert "no output was written" in capsys.readouterr().err
    assert listing(an_output_folder) == before


def test_ctrl_c_while_outputs_are_written_exits_130_and_writes_nothing(
    a_2d_pair_on_disk, an_output_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """The warped image is already staged when Ctrl-C arrives in the transform's write."""
    from DeepRegisterLib.imaging import fileio

    def interrupted(transform, path):
        assert any(p.name.startswith(".warped.nii.gz.partial-") for p in an_output_folder.iterdir())
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "write_transform", interrupted)
    before = listing(an_output_folder)
    code = cli.main([*register_arguments(a_2d_pair_on_disk, an_output_folder), "--quiet"])
    assert code == cli.EXIT_INTERRUPTED
    assert "no output was written" in capsys.readouterr().err
    assert listing(an_output_folder) == before


# --- a process killed outright (SIGKILL) --------------------------------------------------------

OUTPUT_NAMES = ("warped.nii.gz", "transform.h5", "jacobian.nii.gz", "report.json")


def kill_when(command: list[str], marker: str, cwd: Path) -> str:
    """Start ``command``, SIGKILL it as soon as a line of its stderr starts with ``marker``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               text=True, cwd=cwd, env=env)  # fmt: skip
    seen = []
    try:
        for line in process.stderr:
            seen.append(line)
            if line.startswith(marker):
                process.send_signal(signal.SIGKILL)
                break
        process.wait(timeout=60)
    finally:
        process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "".join(seen)
    return "".join(seen)


def assert_no_output_under_its_name(folder: Path, before: dict[str, int]) -> list[str]:
    """Only the earlier files, unchanged, plus possibly hidden staging folders; returns those."""
    now = listing(folder)
    staging = sorted(name for name in now if name not in before)
    assert {name: now[name] for name in before} == before
    for name in staging:
        assert name.startswith("."), name
        assert ".partial-" in name, name
        assert name.split(".partial-")[0][1:] in OUTPUT_NAMES
    for name in OUTPUT_NAMES:
        assert name not in now or name in before
    return staging


def test_a_cli_run_killed_mid_registration_leaves_no_output(
    a_2d_pair_on_disk, an_output_folder: Path
) -> None:
    before = listing(an_output_folder)
    command = [sys.executable, "-m", "DeepRegisterLib",
               *register_arguments(a_2d_pair_on_disk, an_output_folder)]  # fmt: skip
    kill_when(command, "PROGRESS", an_output_folder.parent)
    assert assert_no_output_under_its_name(an_output_folder, before) == []


def test_a_cli_run_killed_while_writing_leaves_no_output_under_its_name(
    a_2d_pair_on_disk, an_output_folder: Path
) -> None:
    """Killed while the outputs are written side by side and the Jacobian is half-written: no
    final name appears or changes. The staging folders stay behind (SIGKILL runs no
    cleanup): hidden, never named as an output, but each holds a file of the output's name
    (by design, for detached headers) — the half-written Jacobian among them."""
    driver = textwrap.dedent("""
        import sys, time
        import SimpleITK as sitk
        from DeepRegisterLib.cli import main as cli
        real = sitk.WriteImage
        def slow(image, path, *args):
            if "jacobian" in str(path):
                open(path, "wb").write(b"half a jacobian")
                print("STAGED", file=sys.stderr, flush=True)
                time.sleep(60)
            return real(image, path, *args)
        sitk.WriteImage = slow
        sys.exit(cli.main(sys.argv[1:]))
    """)
    before = listing(an_output_folder)
    command = [sys.executable, "-c", driver,
               *register_arguments(a_2d_pair_on_disk, an_output_folder), "--quiet"]  # fmt: skip
    kill_when(command, "STAGED", an_output_folder.parent)
    staging = assert_no_output_under_its_name(an_output_folder, before)
    # Outputs are written side by side: which others were staged when the Jacobian's writer
    # hung depends on the threads, but only outputs' staging folders can be there.
    staged = {name.split(".partial-")[0] for name in staging}
    assert ".jacobian.nii.gz" in staged
    assert staged <= {".warped.nii.gz", ".transform.h5", ".jacobian.nii.gz", ".report.json"}
    # (The CLI stages each output and fileio stages it again inside: folders are nested.)
    leftovers = {path.name: path for path in an_output_folder.rglob("*") if path.is_file()}
    # (A .nii.gz is written as .nii by ITK, then gzipped by fileio: the half file is the .nii.)
    (half,) = [path for name, path in leftovers.items() if name.startswith("jacobian.nii")]
    assert half.read_bytes() == b"half a jacobian"
