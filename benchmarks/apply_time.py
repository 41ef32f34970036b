#!/usr/bin/env python
"""What a Slicer user waits for after Apply: the module's own path (``mrml.RegistrationProcess``
in a headless slicer-core scene), from Apply to the nodes in the scene.

    python benchmarks/apply_time.py --pairs 4
    python benchmarks/apply_time.py --pairs 4 --inverse     # the inverse transform too
    python benchmarks/apply_time.py --smoke --out /tmp/apply-time

Each pair runs twice, one after the other: with a child started by Apply ("new child", what every
Apply paid before), and with a child that has waited ``--wait`` seconds, as it does while the user
chooses volumes ("waiting child", ``mrml.startStandby``). Phases: reading the nodes, writing the
inputs, the child (reading, registering, writing), reading its outputs, pushing them into the
scene. The new child is the anchor: the waiting child's time is also given as a multiple of it.
A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

from benchmarks.command_pairs import fsdev, phantoms  # noqa: E402
from benchmarks.run_benchmark import DEFAULT_DATA, DEFAULT_OUT, machine_info, usable_cores  # noqa: E402

PHASES = ("read_nodes_s", "write_inputs_s", "child_s", "read_outputs_s", "push_s")
VERSIONS = ("new child", "waiting child")


def apply_once(
    scene, pair: dict[str, str], preset: str, waiting: bool, wait_s: float, inverse: bool
) -> dict:
    """One Apply of ``pair`` (moving and fixed as volume nodes of ``scene``), timed by phase;
    ``inverse``: with the module's inverse transform output."""
    import SimpleITK as sitk

    from DeepRegisterLib import mrml

    nodes = {}
    for key in ("fixed", "moving"):
        nodes[key] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", key)
        mrml.updateVolumeNodeFromImage(nodes[key], sitk.ReadImage(pair[key]))
        nodes[key].CreateDefaultDisplayNodes()  # as Slicer shows a volume it loads
    mrml.endStandby()
    if waiting:
        mrml.startStandby(mrml.childPython())
        time.sleep(wait_s)  # the user choosing volumes and settings
    clock = [time.perf_counter()]
    job = mrml.prepareRegistration(
        nodes["fixed"], nodes["moving"], preset, createOutputVolume=True, device="cpu",
        compute_inverse=inverse,
    )  # fmt: skip
    clock.append(time.perf_counter())
    process = mrml.RegistrationProcess(job).start()
    clock.append(time.perf_counter())
    while process.running:
        process.poll()
        time.sleep(0.02)  # the module polls every 0.1 s
    clock.append(time.perf_counter())
    outputs = process.finish()
    clock.append(time.perf_counter())
    pushed = job.push(outputs)
    clock.append(time.perf_counter())
    phases = {name: b - a for name, a, b in zip(PHASES, clock[:-1], clock[1:], strict=True)}
    engine_s, inverse = outputs.report["runtime_s"], pushed.inverseTransformNode is not None
    return {**phases, "total_s": clock[-1] - clock[0], "engine_s": engine_s, "inverse": inverse}


def measure(args: argparse.Namespace, work: Path, save) -> dict[str, Any]:
    import slicer

    os.environ.update({name: str(args.threads) for name in (
        "OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")})  # fmt: skip
    pairs = phantoms(args.pairs, work) if args.smoke else fsdev(args.data, args.pairs)
    results: dict[str, Any] = {"runs": []}
    for pair in pairs:
        for version in VERSIONS:
            scene = slicer.vtkMRMLScene()
            waiting = version == "waiting child"
            row = apply_once(scene, pair, args.preset, waiting, args.wait, args.inverse)
            scene.Clear(1)
            row.update(pair=pair["name"], version=version)
            results["runs"].append(row)
            print(f"{pair['name']} {version}: {row['total_s']:.1f} s", flush=True)
            save(results)
    return results


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    runs = results["runs"]
    mean = {
        version: {key: statistics.mean(r[key] for r in runs if r["version"] == version)
                  for key in (*PHASES, "total_s", "engine_s")}
        for version in VERSIONS if any(r["version"] == version for r in runs)
    }  # fmt: skip
    anchor = mean.get("new child", {}).get("total_s")
    lines = [
        "# What a Slicer user waits for after Apply: the module's child process, Apply to nodes",
        "",
        f"Preset {args.preset}{', with the inverse transform' if args.inverse else ''}, "
        f"{args.threads} threads, on the CPU; the waiting child was started {args.wait:g} s "
        "before Apply. Phases: reading the nodes / writing the inputs / the child / reading its "
        "outputs / pushing them into the scene.",
        "",
        "| version | pairs | Apply → nodes s | × new child | phases s | engine s |",
        "|---|---|---|---|---|---|",
    ]
    for version, values in mean.items():
        ratio = f"{values['total_s'] / anchor:.2f}×" if anchor else "–"
        phases = " / ".join(f"{values[key]:.2f}" for key in PHASES)
        count = sum(r["version"] == version for r in runs)
        lines.append(
            f"| {version} | {count} | {values['total_s']:.2f} | {ratio} | {phases} "
            f"| {values['engine_s']:.2f} |"
        )
    lines += [
        "",
        "| pair | version | Apply → nodes s | phases s | engine s |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        phases = " / ".join(f"{r[key]:.2f}" for key in PHASES)
        total, engine = r["total_s"], r["engine_s"]
        lines.append(f"| {r['pair']} | {r['version']} | {total:.2f} | {phases} | {engine:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="fs-dev pairs (default 4)")
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--wait", type=float, default=5.0, help="seconds the child waits")
    parser.add_argument("--inverse", action="store_true", help="ask for the inverse transform")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the fs-dev folder")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default="", help="suffix for the result files' names")
    parser.add_argument("--smoke", action="store_true", help="one tiny phantom pair")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.wait = 1, 2.0
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-apply-time{'-' + args.tag if args.tag else ''}"
    json_path, md_path = args.out / f"{stem}.json", args.out / f"{stem}.md"

    def save(results: dict[str, Any]) -> None:
        results["machine"] = machine_info("cpu")
        json_path.write_text(json.dumps(results, indent=1))
        md_path.write_text(markdown(results, args))

    with tempfile.TemporaryDirectory() as work:
        save(measure(args, Path(work), save))
    print(md_path.read_text())
    print(f"wrote {md_path} and .json")


if __name__ == "__main__":
    main()
