"""Training in two real processes with torch.distributed (gloo on the CPU), as torchrun runs it.

Each test starts real processes: ``torch.multiprocessing.spawn`` with the environment torchrun
would set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), or ``torchrun`` itself on
the command line. Tiny 2D networks, a few steps, one thread per process.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.multiprocessing as mp

from DeepRegisterLib.cli.train import add_train_parser, run_train
from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense, warp
from DeepRegisterLib.training.batches import draw_batch
from DeepRegisterLib.training.checkpoints import CHECKPOINT
from DeepRegisterLib.training.config import SynthesisConfig, TrainingConfig
from DeepRegisterLib.training.distributed import Ranks, process_group
from DeepRegisterLib.training.log import LOG
from DeepRegisterLib.training.loop import train
from DeepRegisterLib.training.pairs import PairFiles
from DeepRegisterLib.training.step import TrainingStep
from DeepRegisterLib.training.synthesis import Synthesiser

ROOT = Path(__file__).resolve().parents[1]
PRELOADED = ["torch", "SimpleITK", "pytest", "DeepRegisterLib.training.loop"]
NETWORK = NetworkConfig(dim=2, encoder=(4, 4, 4, 4), decoder=(4, 4, 4, 4, 4))


def _config(**changes: Any) -> TrainingConfig:
    base = TrainingConfig(
        shape=(32, 32),
        spacing_mm=1.0,
        steps=3,
        learning_rate=1e-3,
        validate_every=3,
        checkpoint_every=3,
        network=NETWORK,
    )
    return dataclasses.replace(base, **changes)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _process(rank: int, world: int, port: int, job: Callable[..., None], args: tuple) -> None:
    """One of the processes, set up as torchrun sets up its workers."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    with process_group(torch.device("cpu")):
        job(*args)


def _in_processes(world: int, job: Callable[..., None], *args: Any) -> None:
    """Run ``job(*args)`` in ``world`` processes. They fork from a server that has imported
    torch and the training code once: a fresh interpreter per process would take longer to
    start than the few steps take."""
    mp.get_context("forkserver").set_forkserver_preload(PRELOADED)
    mp.start_processes(
        _process, (world, _free_port(), job, args), nprocs=world, start_method="forkserver"
    )


def _train_job(config: TrainingConfig, out: Path, kwargs: dict[str, Any]) -> None:
    train(config, out, progress=None, **kwargs)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def _losses(out: Path) -> list[float]:
    with (out / LOG).open() as stream:
        return [float(r["loss"]) for r in csv.DictReader(stream) if r["loss"]]


# --- one step at a time ------------------------------------------------------------------------


def _steps_job(config: TrainingConfig, out: Path, steps: int) -> None:
    """Train ``steps`` steps; every process writes its weights after each."""
    ranks = Ranks.current()
    torch.manual_seed(config.seed)
    network = VxmDense(config.network)
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    synthesiser = Synthesiser(config.shape, config.synthesis)
    step = TrainingStep(network, optimiser, config, synthesiser, None, ranks)
    for number in range(1, steps + 1):
        losses = step(number)
        weights = {k: v.detach().clone() for k, v in network.state_dict().items()}
        torch.save({"losses": losses, "model": weights}, out / f"rank{ranks.rank}-{number}.pt")


def test_every_process_holds_the_same_weights_after_every_step_as_one_with_the_whole_batch(
    tmp_path: Path,
) -> None:
    """DDP averages the gradients: two processes with batch 1 take the very step one process
    with batch 2 takes (each draws its own pairs), and stay identical to each other."""
    config = _config()
    _in_processes(2, _steps_job, config, tmp_path, 3)
    alone = tmp_path / "alone"
    alone.mkdir()
    _steps_job(dataclasses.replace(config, batch_size=2), alone, 3)

    torch.manual_seed(config.seed)
    previous = VxmDense(NETWORK).state_dict()  # the initial weights
    for number in (1, 2, 3):
        first, second = (torch.load(tmp_path / f"rank{r}-{number}.pt") for r in (0, 1))
        whole = torch.load(alone / f"rank0-{number}.pt")
        for key, value in first["model"].items():
            assert torch.equal(value, second["model"][key]), (number, key)
            torch.testing.assert_close(value, whole["model"][key], rtol=1e-4, atol=1e-6)
        assert not torch.equal(first["model"]["flow.weight"], previous["flow.weight"])
        previous = first["model"]
        assert first["losses"] == second["losses"]  # averaged over the processes
        assert first["losses"]["loss"] == pytest.approx(whole["losses"]["loss"], rel=1e-5)


def test_processes_draw_different_pairs() -> None:
    """Each process trains on its own share of the batch: the same step's pairs differ."""
    config = _config()
    synthesiser = Synthesiser(config.shape, config.synthesis)
    first, second = (draw_batch(config, synthesiser, None, 1, rank)[0] for rank in (0, 1))
    assert not torch.equal(first.fixed, second.fixed)
    whole = draw_batch(dataclasses.replace(config, batch_size=2), synthesiser, None, 1)
    assert torch.equal(whole[1].fixed, second.fixed)


# --- whole runs ----------------------------------------------------------------------------------


def _bumped_pair(folder: Path) -> PairFiles:
    """A real pair whose moving image is the fixed one under a smooth local bump."""
    config = SynthesisConfig(shape_spacing=12.0, blur_sigma=0.0, bias_std=0.0)
    fixed = Synthesiser((32, 32), config)(torch.Generator().manual_seed(2)).fixed
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    bump = 4.0 * torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 60)
    moving = warp(fixed, torch.stack([bump, -bump])[None], padding_mode="border")
    paths = []
    for name, image in (("fixed", fixed), ("moving", moving)):
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(sitk.GetImageFromArray(image[0, 0].numpy()), str(paths[-1]))
    return PairFiles(*paths)


def test_two_processes_lower_the_loss_and_the_main_one_saves_the_model(tmp_path: Path) -> None:
    config = _config(steps=20, learning_rate=3e-3, real_fraction=1.0, validate_every=10)
    out = tmp_path / "run"
    _in_processes(2, _train_job, config, out, {"real_pairs": [_bumped_pair(tmp_path)]})
    losses = _losses(out)
    assert len(losses) == 20  # one row a step: only the main process logs
    assert np.mean(losses[-5:]) < losses[0] - 0.03
    recorded = json.loads((out / "model.json").read_text())["training"]
    assert recorded["processes"] == 2
    assert recorded["steps"] == 20
    assert len(recorded["validation"]["best"]) == 4  # held-out synthetic pairs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of 3 steps in two processes with batch 1 (a reference for two tests:
    starting processes takes longer than their few steps)."""
    out = tmp_path_factory.mktemp("two-processes")
    _in_processes(2, _train_job, _config(), out, {})
    return out


def test_two_processes_train_as_one_with_twice_the_batch(
    tmp_path: Path, two_processes: Path
) -> None:
    train(_config(batch_size=2), tmp_path, progress=None)
    two, one = (_weights(run / CHECKPOINT) for run in (two_processes, tmp_path))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-6)
    assert _losses(two_processes) == pytest.approx(_losses(tmp_path), rel=1e-5)


def test_a_distributed_run_resumes_from_a_checkpoint_exactly(
    tmp_path: Path, two_processes: Path
) -> None:
    """Stopped by its time budget after step 1 (all processes stop together) and resumed by
    two processes == 3 steps straight, each step logged once."""
    config = _config()
    _in_processes(2, _train_job, dataclasses.replace(config, max_minutes=1e-9), tmp_path, {})
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == 1
    _in_processes(2, _train_job, config, tmp_path, {"resume": True})

    straight, resumed = (_weights(run / CHECKPOINT) for run in (two_processes, tmp_path))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    with (tmp_path / LOG).open() as stream:
        assert [int(r["step"]) for r in csv.DictReader(stream)] == [0, 1, 2, 3]


# --- the command line ------------------------------------------------------------------------


def _torchrun(*argv: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "DeepRegisterLib", "train", *argv,
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=300
    )


def test_torchrun_trains_with_two_processes_and_one_process_resumes(tmp_path: Path) -> None:
    """The real command line under torchrun; its checkpoint then resumes in a single process
    (any checkpoint resumes in any number of processes)."""
    common = (
        "--out", str(tmp_path), "--name", "ddp", "--shape", "32", "32", "--spacing", "1",
        "--encoder", "4", "4", "4", "4", "--decoder", "4", "4", "4", "4", "4",
        "--validate-every", "2", "--checkpoint-every", "2", "--device", "cpu",
    )  # fmt: skip
    launched = _torchrun(*common, "--steps", "2")
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.count('"kind": "synthetic"') == 1  # the main process's summary only
    recorded = json.loads((tmp_path / "ddp.json").read_text())["training"]
    assert (recorded["processes"], recorded["steps"]) == (2, 2)

    parser = argparse.ArgumentParser()
    add_train_parser(parser.add_subparsers())
    args = parser.parse_args(["train", *common, "--steps", "4", "--resume"])
    assert run_train(args) == 0
    with (tmp_path / LOG).open() as stream:
        assert [int(r["step"]) for r in csv.DictReader(stream)] == [0, 1, 2, 3, 4]
    recorded = json.loads((tmp_path / "ddp.json").read_text())["training"]
    assert (recorded["processes"], recorded["steps"]) == (1, 4)
