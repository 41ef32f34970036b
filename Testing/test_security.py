"""Hostile files and the machine's boundaries: weights that carry code, configs that would
exhaust memory, corrupt or impossible model files, shell and code injection, network access.

(test_models covers a payload saved with torch.save in the current format; test_bad_input
a flipped bit, a missing checksum and absurd layer counts with the network class stubbed.)
"""

from __future__ import annotations

import ast
import json
import math
import os
import pickle
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from conftest import grid_centre, make_phantom, oblique_grid

from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.errors import ModelError
from DeepRegisterLib.imaging import fileio
from DeepRegisterLib.nn import models
from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense
from DeepRegisterLib.registration.engine import register

PACKAGE = Path(__file__).resolve().parents[1] / "DeepRegisterLib"
TINY = dict(encoder=(4, 4), decoder=(4, 4, 4))


@pytest.fixture
def a_2d_model(tmp_path: Path) -> models.ModelInfo:
    torch.manual_seed(0)
    return models.save_model(VxmDense(NetworkConfig(dim=2, **TINY)), tmp_path / "models", "m2d",
                             extra_config={"input_spacing_mm": 2.0})  # fmt: skip


@pytest.fixture(scope="module")
def a_2d_pair() -> tuple[sitk.Image, sitk.Image]:
    grid = oblique_grid(2, size=(28, 24))
    phantom = make_phantom(2, grid_centre(grid), scale_mm=9.0)
    return phantom.image(grid), phantom.image(grid, through=lambda y: y - 1.5)


def refresh_checksum(info: models.ModelInfo) -> None:
    """Make the .sha256 agree with the file: the hostile file is "trusted" by its hash."""
    digest = models.sha256_of(info.weights)
    info.weights.with_suffix(".sha256").write_text(f"{digest}  {info.weights.name}\n")


def is_refused(info: models.ModelInfo, pair, match: str, loading: bool = True) -> str:
    """Refused by ``register`` (and by ``load_model`` if ``loading``) with a ModelError
    naming ``match``."""
    if loading:
        with pytest.raises(ModelError, match=match):
            models.load_model(models.find_model(info.weights))
    with pytest.raises(ModelError, match=match) as caught:
        register(*pair, model=info.weights, preset="fast", iterations=1, device="cpu")
    return str(caught.value)


# --- weights that carry code -----------------------------------------------------------------


class MakesDirectory:
    """Unpickling this creates a folder: harmless proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def legacy_torch_file(path: Path, marker: Path) -> None:
    state = VxmDense(NetworkConfig(dim=2, **TINY)).state_dict()
    torch.save({**state, "x": MakesDirectory(marker)}, path, _use_new_zipfile_serialization=False)


def plain_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(MakesDirectory(marker), protocol=2))


def zip_with_a_hand_made_pickle(path: Path, marker: Path) -> None:
    """A valid torch zip archive whose data.pkl is replaced by a raw GLOBAL/REDUCE payload."""
    torch.save(VxmDense(NetworkConfig(dim=2, **TINY)).state_dict(), path)
    payload = b"\x80\x02cposix\nmkdir\nq\x00X" + len(str(marker)).to_bytes(4, "little")
    payload += str(marker).encode() + b"q\x01\x85q\x02Rq\x03."
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, payload if name.endswith("/data.pkl") else data)


@pytest.mark.parametrize("make", [legacy_torch_file, plain_pickle, zip_with_a_hand_made_pickle])
def test_weights_carrying_code_are_refused_and_the_code_never_runs(
    a_2d_model: models.ModelInfo, a_2d_pair, tmp_path: Path, make
) -> None:
    live = tmp_path / "payload-is-live"
    make(tmp_path / "probe.pt", live)  # the same payload, unpickled unsafely, does run:
    if make is plain_pickle:
        pickle.loads((tmp_path / "probe.pt").read_bytes())
    else:
        torch.load(tmp_path / "probe.pt", weights_only=False)
    assert live.is_dir()

    marker = tmp_path / "code-ran"
    make(a_2d_model.weights, marker)
    refresh_checksum(a_2d_model)
    is_refused(a_2d_model, a_2d_pair, "cannot read weights")
    assert not marker.exists()


# --- configs and files that would exhaust memory or time ------------------------------------------


#: Run in a fresh process, whose peak resident size is still that of its imports: in a long
#: pytest process ``ru_maxrss`` has long passed any allocation a refusal could make, and rises
#: no more. Reads the pair and the model, records its peak, runs the steps, prints the rise.
MEASURE_IN_A_FRESH_PROCESS = """
import json, resource, sys, time
import SimpleITK as sitk
import torch
from DeepRegisterLib.errors import ModelError
from DeepRegisterLib.nn import models
from DeepRegisterLib.registration.engine import register

names, weights, *images = sys.argv[1:]
pair = [sitk.ReadImage(path) for path in images]
steps = {
    "load": lambda: models.load_model(models.find_model(weights)),
    "register": lambda: register(*pair, model=weights, preset="fast", iterations=1, device="cpu"),
    "allocate": lambda: torch.ones(2**26),  # the control: 256 MB
}


def peak() -> int:
    # VmHWM belongs to this address space, new at exec; ru_maxrss is inherited across fork and
    # exec, so a child of a big pytest process would start at the parent's peak.
    try:
        status = open("/proc/self/status").read()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


before, started, errors = peak(), time.perf_counter(), []
for name in names.split(","):
    try:
        steps[name]()
        errors.append(None)
    except ModelError as refused:
        errors.append(str(refused))
print(json.dumps({"rise": peak() - before, "seconds": time.perf_counter() - started,
                  "errors": errors}))
"""


def measured_in_a_fresh_process(steps: str, weights: Path, pair, folder: Path) -> dict:
    """The peak-memory rise (bytes) and the time of ``steps`` (names, comma-separated) and the
    ModelError's message (or None) of each."""
    images = [folder / "fixed.mha", folder / "moving.mha"]
    for image, path in zip(pair, images, strict=True):
        sitk.WriteImage(image, str(path))
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE_IN_A_FRESH_PROCESS, steps, str(weights), *map(str, images)],
        capture_output=True, text=True, cwd=PACKAGE.parent, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.splitlines()[-1])


def test_the_fresh_process_sees_an_allocation(a_2d_model, a_2d_pair, tmp_path: Path) -> None:
    """The measurement below can fail: a 256 MB tensor shows as a rise of about 256 MB."""
    measured = measured_in_a_fresh_process("allocate", a_2d_model.weights, a_2d_pair, tmp_path)
    assert measured["rise"] > 200 << 20


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (dict(encoder=[10**6] * 4, decoder=[10**6] * 6), "feature counts"),
        (dict(encoder=[16] * 50, decoder=[16] * 50), "encoder must have"),
        (dict(encoder=[1e400, 4]), "infinity"),  # JSON's Infinity
        (dict(in_channels=10**9), "parameters"),
    ],
    ids=["features-1e6", "50-levels", "infinite", "1e9-channels"],
)
def test_an_absurd_config_is_refused_at_once_without_allocating(
    a_2d_model: models.ModelInfo, a_2d_pair, tmp_path: Path, network: dict, message: str
) -> None:
    """Both ways in, loading the model and registering with it, in one fresh process."""
    path = a_2d_model.weights.with_suffix(".json")
    config = json.loads(path.read_text())
    config["network"].update(network)
    path.write_text(json.dumps(config))
    measured = measured_in_a_fresh_process("load,register", a_2d_model.weights, a_2d_pair, tmp_path)
    assert [message in (error or "no ModelError") for error in measured["errors"]] == [True] * 2
    assert measured["seconds"] < 1.0
    assert measured["rise"] < 64 << 20  # a 10⁶-feature layer alone is > 200 MB


@pytest.mark.parametrize("spacing", [float("nan"), "two", -2.0, 0.0])
def test_an_impossible_input_spacing_is_refused(a_2d_model, a_2d_pair, spacing) -> None:
    path = a_2d_model.weights.with_suffix(".json")
    path.write_text(json.dumps({**json.loads(path.read_text()), "input_spacing_mm": spacing}))
    is_refused(a_2d_model, a_2d_pair, "input_spacing_mm must be a positive", loading=False)


def test_weights_that_are_a_device_or_far_too_large_are_refused_before_reading(
    a_2d_model: models.ModelInfo, a_2d_pair
) -> None:
    """/dev/zero would be hashed forever; a 100 GB (sparse) file for hours."""
    a_2d_model.weights.unlink()
    a_2d_model.weights.symlink_to("/dev/zero")
    started = time.perf_counter()
    is_refused(a_2d_model, a_2d_pair, "not a regular file")
    a_2d_model.weights.unlink()
    with a_2d_model.weights.open("wb") as sparse:
        sparse.truncate(100 * 2**30)
    is_refused(a_2d_model, a_2d_pair, "larger than any permitted network")
    assert time.perf_counter() - started < 2.0


# --- corrupt model files ------------------------------------------------------------------


def test_truncated_weights_are_refused_whether_or_not_the_checksum_was_updated(
    a_2d_model: models.ModelInfo, a_2d_pair
) -> None:
    data = a_2d_model.weights.read_bytes()
    a_2d_model.weights.write_bytes(data[: len(data) // 2])
    is_refused(a_2d_model, a_2d_pair, "checksum mismatch")
    refresh_checksum(a_2d_model)
    is_refused(a_2d_model, a_2d_pair, "cannot read weights")


@pytest.mark.parametrize("content", ["", "\n", "not-a-digest  m2d.pt\n", "ab" * 31 + "  m2d.pt"])
def test_a_malformed_checksum_file_is_refused(a_2d_model, a_2d_pair, content: str) -> None:
    a_2d_model.weights.with_suffix(".sha256").write_text(content)
    is_refused(a_2d_model, a_2d_pair, "does not hold a SHA-256 digest")


def test_weights_that_produce_nan_are_refused_rather_than_giving_a_nan_field(
    a_2d_model: models.ModelInfo, a_2d_pair
) -> None:
    state = torch.load(a_2d_model.weights, weights_only=True)
    state["flow.bias"] = torch.full_like(state["flow.bias"], math.nan)
    torch.save(state, a_2d_model.weights)
    refresh_checksum(a_2d_model)
    with pytest.raises(ModelError, match="non-finite"):
        register(*a_2d_pair, model=a_2d_model.weights, preset="fast", iterations=0, device="cpu")


# --- no shell, no eval, no unsafe loading ----------------------------------------------------

FORBIDDEN_CALLS = {
    "os.system", "os.popen", "os.spawnl", "os.spawnv", "os.execv", "os.execl",
    "subprocess.run", "subprocess.call", "subprocess.check_call", "subprocess.check_output",
    "subprocess.Popen", "eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads",
    "marshal.loads", "shelve.open",
}  # fmt: skip
FORBIDDEN_IMPORTS = {"subprocess", "pickle", "marshal", "shelve", "socket", "urllib", "http",
                     "requests", "ftplib", "smtplib"}  # fmt: skip
#: The one sanctioned child process: the Slicer module's child runs the library's own command
#: line with an argument list (never a shell: ``shell=`` stays forbidden everywhere).
ALLOWED = {"child_process.py": {"import subprocess", "subprocess.Popen()"}}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def findings(source: Path) -> list[str]:
    """Shell/code execution, unsafe unpickling, network modules and torch.load without
    ``weights_only=True`` in one file, as 'file:line what'."""
    allowed = ALLOWED.get(source.name, set()) if source.parent.name == "mrml" else set()
    return [f for f in _all_findings(source) if f.split(" ", 1)[1] not in allowed]


def _all_findings(source: Path) -> list[str]:
    tree = ast.parse(source.read_text(), str(source))
    found = []
    for node in ast.walk(tree):
        where = f"{source.name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [
                node.module or ""]  # fmt: skip
            found += [f"{where} import {n}" for n in names if n.split(".")[0] in FORBIDDEN_IMPORTS]
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if name in FORBIDDEN_CALLS:
            found.append(f"{where} {name}()")
        if any(k.arg == "shell" for k in node.keywords):
            found.append(f"{where} {name}(shell=...)")
        if name.endswith("torch.load"):
            safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                       and k.value.value is True for k in node.keywords)  # fmt: skip
            if not safe:
                found.append(f"{where} torch.load without weights_only=True")
    return found


def test_the_checker_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import os, subprocess\nos.system('x')\nsubprocess.run('x', shell=True)\n"
                      "eval('1')\nimport torch\ntorch.load('m.pt')\n")  # fmt: skip
    assert len(findings(sample)) == 6


def test_the_package_never_runs_a_shell_evaluates_code_or_unpickles() -> None:
    """Paths (often user-chosen file names) can then never reach a shell or an interpreter."""
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 10
    assert [f for source in sources for f in findings(source)] == []


# --- no network at run time ----------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any attempt to resolve a name or open a connection raises (and is recorded)."""
    attempts: list[str] = []

    def refuse(what):
        def refused(*args, **kwargs):
            attempts.append(f"{what}{args[1:] if what.startswith('socket.socket') else args}")
            raise OSError(f"network access attempted: {what}")

        return refused

    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, refuse(f"socket.socket.{name}"))
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, refuse(f"socket.{name}"))
    return attempts


def test_registering_writing_outputs_and_the_demo_need_no_network(
    no_network: list[str], a_2d_pair, tmp_path: Path
) -> None:
    inputs = []
    for name, image in zip(("fixed.nii.gz", "moving.nrrd"), a_2d_pair, strict=True):
        inputs.append(fileio.write_image(image, tmp_path / name))
    out = tmp_path / "out"
    out.mkdir()
    code = cli.main([
        "register", "--fixed", str(inputs[0]), "--moving", str(inputs[1]),
        "--warped", str(out / "w.nii.gz"), "--transform", str(out / "t.h5"),
        "--inverse-transform", str(out / "i.h5"), "--jacobian", str(out / "j.nii.gz"),
        "--qa-png", str(out / "qa.png"), "--report", str(out / "r.json"),
        "--preset", "fast", "--iterations", "4", "--device", "cpu", "--quiet",
    ])  # fmt: skip
    assert code == cli.EXIT_OK
    assert len(list(out.iterdir())) == 6
    assert cli.main(["demo", "--dim", "2", "--output", str(tmp_path / "demo"), "--quiet"]) == 0
    assert (tmp_path / "demo" / "report.json").exists()
    assert no_network == []


def test_the_no_network_fixture_does_block_connections(no_network: list[str]) -> None:
    with pytest.raises(OSError, match="network access attempted"):
        socket.create_connection(("example.org", 80), timeout=1)
    with pytest.raises(OSError, match="network access attempted"), socket.socket() as s:
        s.connect(("127.0.0.1", 9))
    assert len(no_network) == 2
