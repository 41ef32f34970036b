"""Fail CI when a whole component's tests were skipped: a broken install must not pass as green.

``pytest.importorskip("slicer")`` turns a broken ``import slicer`` into a quiet skip of every MRML
test; a missing data folder does the same to the real-data tests. Reads pytest's JUnit XML report
and fails (exit 1) when some component's tests ran none (all skipped, or none collected), naming
the component and the skip reasons.

Usage: python .ci/check_components.py REPORT.xml
"""

from __future__ import annotations

import ast
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

#: Component → its test files; each file must run at least one test.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "MRML bridge (slicer-core)": (
        "Testing/test_mrml.py",
        "Testing/test_mrml_volumes.py",
        "Testing/test_mrml_transforms.py",
    ),
    "Slicer child-process runner": ("Testing/test_process_runner.py", "Testing/test_starvation.py"),
    "training": (
        "Testing/test_training_synthesis.py",
        "Testing/test_training_loop.py",
        "Testing/test_training_real_pairs.py",
        "Testing/test_training_cli.py",
    ),
    "Dask batch": ("Testing/test_batch.py", "Testing/test_batch_more_images.py"),
    "distributed training": ("Testing/test_distributed_training.py",),
    "compiled grid sampler": ("Testing/test_trilinear_sampler.py",),
    "compiled affine descent": ("Testing/test_affine_descent.py",),
    "forked worker processes": ("Testing/test_forked_children.py",),
}
#: Required only where the data is: CI has ../shared/data, a clone elsewhere need not.
WITH_SHARED_DATA = {"real brain data": ("Testing/test_realdata.py",)}


def file_of(case: ET.Element) -> str:
    """``Testing/test_x.py`` for a test case: its class name is the dotted module (plus a class,
    if any); a module skipped while collected has an empty class name and the module as name."""
    dotted = case.get("classname") or case.get("name", "")
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = "/".join(parts[:end]) + ".py"
        if (ROOT / candidate).is_file():
            return candidate
    return dotted


def outcomes(report: Path) -> dict[str, Counter]:
    """Per test file: how many test cases ran and how many were skipped, with the reasons."""
    found: dict[str, Counter] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        counts = found.setdefault(file_of(case), Counter())
        skipped = case.find("skipped")
        if skipped is None:
            counts["ran"] += 1
        else:
            counts[f"skipped: {skip_reason(skipped)}"] += 1
    return found


def skip_reason(skipped: ET.Element) -> str:
    """The reason given to ``pytest.skip``; a skipped module's is inside a (file, line, reason)
    tuple's text."""
    text = skipped.text or skipped.get("message", "")
    try:
        where = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return str(where[2]).removeprefix("Skipped: ") if isinstance(where, tuple) else text


def missing_components(found: dict[str, Counter], required: dict[str, tuple[str, ...]]) -> list:
    problems = []
    for component, files in required.items():
        for name in files:
            counts = found.get(name, Counter())
            if counts["ran"]:
                continue
            reasons = "; ".join(sorted(k for k in counts if k.startswith("skipped"))) or (
                "no test collected: is the file renamed? update .ci/check_components.py"
            )
            problems.append(f"{component}: no test of {name} ran — {reasons}")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    required = dict(COMPONENTS)
    if SHARED_DATA.is_dir():
        required.update(WITH_SHARED_DATA)
    problems = missing_components(outcomes(Path(argv[0])), required)
    for problem in problems:
        print(f"check_components: {problem}", file=sys.stderr)
    if not problems:
        ran = ", ".join(required)
        print(f"check_components: every component ran its tests ({ran})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
