"""The house's rules for DeepRegisterLib, read from the source with ``ast`` (nothing is imported).

Every import points down the data flow:

* applications: ``cli`` (the command line), ``batch`` (many pairs), ``mrml`` (the Slicer bridge);
* the pipeline: ``registration`` and ``evaluation`` (each on foundations only), ``training``
  (which also reuses the registration's affine stage and may use the evaluation);
* foundations: ``nn`` and ``imaging`` (independent of each other), ``errors`` (below both),
  ``process_memory`` (what a process that exists to register asks of the C library: ``cli`` and
  ``batch`` only), and the shipped model files (``shipped_models``, read by ``nn.models``).

Among the applications, ``cli`` offers ``batch`` as a command, and ``mrml`` runs the command line
in a child process and reads its exit codes (``cli.exit_codes`` only). No cycles between packages.
Only ``mrml`` touches Slicer (``slicer``, ``vtk``); nothing touches its GUI (``qt``, ``ctk``).
Sizes: files ≤ 400 lines, functions ≤ 80 lines except argparse parser builders.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = "DeepRegisterLib"

ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "process_memory": set(),
    "imaging": {"errors"},
    "nn": {"errors", "shipped_models"},
    "registration": {"errors", "imaging", "nn"},
    "evaluation": {"errors", "imaging", "nn"},
    "training": {"errors", "imaging", "nn", "registration", "evaluation"},
    "batch": {"errors", "imaging", "nn", "registration", "evaluation", "process_memory"},
    "cli": {
        "errors",
        "imaging",
        "nn",
        "registration",
        "evaluation",
        "training",
        "batch",
        "process_memory",
    },
    # mrml runs the command line in a child process and reads its exit codes.
    "mrml": {"errors", "imaging", "nn", "registration", "evaluation", "cli.exit_codes"},
    # The package itself: its facade (``register``, ``RegistrationSettings``,
    # ``apply_transform``); ``python -m``.
    "": {"registration", "imaging"},
    "__main__": {"cli"},
}
#: What any module may take from the package's own ``__init__``: its version, nothing else.
FROM_THE_ROOT = {"__version__"}
SLICER_ONLY = {"slicer", "vtk", "vtkmodules"}
NEVER = {"qt", "ctk", "PythonQt"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
PARSER_BUILDER = re.compile(r"^(_?add_\w*parser\w*|build_parser)$")


@dataclass(frozen=True)
class Import:
    source: str  # dotted module, e.g. "DeepRegisterLib.cli.register"
    target: str  # dotted module imported, e.g. "DeepRegisterLib.registration.engine"
    names: tuple[str, ...]  # names taken from it ("from target import names"), or ()
    line: int

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def subpackages(root: Path = ROOT) -> set[str]:
    """The library's packages, as pyproject.toml names them (``shipped_models`` lives apart).

    A regular expression, not ``tomllib``: the tests run on Python 3.10 too."""
    return set(re.findall(r'"DeepRegisterLib\.(\w+)"', (root / "pyproject.toml").read_text()))


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path = ROOT, packages: set[str] | None = None) -> list[Import]:
    """Every import in ``path`` (at any depth: lazy imports count), relative ones resolved."""
    packages = subpackages(root) if packages is None else packages
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names = tuple(a.name for a in node.names)
            modules = [n for n in names if is_module(f"{base}.{n}", root, packages)]
            found += [Import(module, f"{base}.{n}", (), node.lineno) for n in modules]
            if len(modules) < len(names):
                found.append(Import(module, base, names, node.lineno))
    return found


def is_module(dotted: str, root: Path, packages: set[str]) -> bool:
    """Whether ``from a.b import c`` takes a module (``a/b/c.py``, a package, or one that
    pyproject.toml maps from elsewhere, as ``shipped_models``) rather than a name."""
    path = root.joinpath(*dotted.split("."))
    mapped = dotted.removeprefix(f"{LIBRARY}.") in packages
    return mapped or path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def library_sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / LIBRARY).rglob("*.py"))


def library_imports(root: Path = ROOT) -> list[Import]:
    packages = subpackages(root)
    return [i for path in library_sources(root) for i in imports_of(path, root, packages)]


def package_of(module: str) -> str:
    """The package a module is in: cli for DeepRegisterLib.cli.main, errors for
    DeepRegisterLib.errors, "" for the root (``__init__``)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def direction_violations(imports: list[Import]) -> list[str]:
    found = []
    for item in imports:
        if item.target.split(".")[0] != LIBRARY:
            continue
        source, target = package_of(item.source), package_of(item.target)
        if source == target and target:
            continue
        if not target and set(item.names) <= FROM_THE_ROOT:
            continue
        allowed = ALLOWED.get(source, set())
        module = ".".join(item.target.split(".")[1:3])  # "cli.exit_codes"
        if target not in allowed and module not in allowed:
            found.append(f"{item.where()} {source or LIBRARY} imports {item.target}")
    return found


def package_cycles(imports: list[Import]) -> list[list[str]]:
    """Cycles in the package graph (imports of the root's version left out)."""
    graph: dict[str, set[str]] = {}
    for item in imports:
        source, target = package_of(item.source), package_of(item.target)
        if item.target.split(".")[0] != LIBRARY or source == target:
            continue
        if not target and set(item.names) <= FROM_THE_ROOT:
            continue
        graph.setdefault(source, set()).add(target)
    cycles, state = [], {}  # state: 1 on the current path, 2 finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def foreign_imports(imports: list[Import], tops: set[str], allowed_in: str | None) -> list[str]:
    """Imports of the top-level modules ``tops`` outside package ``allowed_in``."""
    return [
        f"{i.where()} imports {i.target}"
        for i in imports
        if i.target.split(".")[0] in tops and package_of(i.source) != allowed_in
    ]


def functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def long_files(root: Path = ROOT) -> list[str]:
    lengths = {p: len(p.read_text().splitlines()) for p in library_sources(root)}
    return [f"{p.relative_to(root)}: {n}" for p, n in lengths.items() if n > MAX_FILE_LINES]


def long_functions(root: Path = ROOT) -> list[str]:
    found = []
    for path in library_sources(root):
        for f in functions(ast.parse(path.read_text(), str(path))):
            lines = f.end_lineno - f.lineno + 1
            if lines > MAX_FUNCTION_LINES and not PARSER_BUILDER.match(f.name):
                found.append(f"{path.relative_to(root)}:{f.lineno} {f.name}: {lines}")
    return found


# --- the checker finds what it looks for -----------------------------------------------------


@pytest.fixture
def a_small_library(tmp_path: Path) -> Path:
    """A library with one import of each kind, good and bad."""
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackages = ["DeepRegisterLib", "DeepRegisterLib.nn", '
        '"DeepRegisterLib.cli", "DeepRegisterLib.registration", '
        '"DeepRegisterLib.shipped_models"]\n'
    )
    files = {
        "__init__.py": "from .registration.engine import register\n",
        "errors.py": "",
        "nn/__init__.py": "",
        "nn/models.py": "from .. import shipped_models\nfrom ..errors import E\n"
        "def f():\n    from ..registration import engine\n",  # lazy and upward
        "nn/long.py": "x = 1\n" * 401,
        "registration/__init__.py": "",
        "registration/engine.py": "from .. import __version__\nfrom ..nn import models\n"
        "from . import settings\nimport slicer\n",
        "registration/settings.py": "from DeepRegisterLib.cli.main import x\nimport qt\n",
        "cli/__init__.py": "",
        "cli/main.py": "from ..registration.settings import S\nimport vtk\n"
        "def build_parser():\n" + "    pass\n" * 90 + "def run():\n" + "    pass\n" * 81,
    }
    for name, text in files.items():
        path = tmp_path / LIBRARY / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_the_checker_finds_what_it_looks_for(a_small_library: Path) -> None:
    imports = library_imports(a_small_library)
    engine = [i for i in imports if i.source == "DeepRegisterLib.registration.engine"]
    assert [(i.target, i.names) for i in engine] == [
        ("DeepRegisterLib", ("__version__",)),
        ("DeepRegisterLib.nn.models", ()),
        ("DeepRegisterLib.registration.settings", ()),
        ("slicer", ()),
    ]
    assert direction_violations(imports) == [
        "DeepRegisterLib.nn.models:4 nn imports DeepRegisterLib.registration.engine",
        "DeepRegisterLib.registration.settings:1 registration imports DeepRegisterLib.cli.main",
    ]
    assert package_cycles(imports) == [
        ["registration", "cli", "registration"],
        ["registration", "nn", "registration"],
    ]
    assert len(foreign_imports(imports, SLICER_ONLY, "mrml")) == 2
    assert foreign_imports(imports, NEVER, None) == [
        "DeepRegisterLib.registration.settings:2 imports qt"
    ]
    assert long_functions(a_small_library) == ["DeepRegisterLib/cli/main.py:94 run: 82"]
    assert long_files(a_small_library) == ["DeepRegisterLib/nn/long.py: 401"]


# --- the rules, on the library -----------------------------------------------------------------


def test_every_package_has_its_place_in_the_layers() -> None:
    on_disk = {p.parent.name for p in (ROOT / LIBRARY).glob("*/__init__.py")}
    assert on_disk <= set(ALLOWED), f"add {on_disk - set(ALLOWED)} to the layers"
    assert on_disk <= subpackages(), "pyproject.toml must list every package"


def test_every_import_inside_the_library_points_down() -> None:
    imports = library_imports()
    assert len(imports) > 100  # the walk sees the library
    assert direction_violations(imports) == []


def test_there_is_no_cycle_between_packages() -> None:
    assert package_cycles(library_imports()) == []


def test_only_the_mrml_bridge_imports_slicer_and_nothing_imports_its_gui() -> None:
    imports = library_imports()
    assert foreign_imports(imports, SLICER_ONLY, "mrml") == []
    assert foreign_imports(imports, NEVER, None) == []
    assert any(i.target == "slicer" for i in imports), "the bridge itself should import slicer"


def test_no_library_file_is_over_400_lines() -> None:
    assert long_files() == []


def test_no_function_is_over_80_lines_except_parser_builders() -> None:
    assert long_functions() == []
