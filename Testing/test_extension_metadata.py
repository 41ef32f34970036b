"""The extension's build files and its ExtensionsIndex description, parsed here (no CMake).

The CMake files must name every file the extension installs. Slicer's extension build writes its
own description from the ``EXTENSION_*`` variables of the top-level CMakeLists.txt; the index
entry (DeepRegister.s4ext) is written by hand: both must agree, and the files the URLs name must
exist in this repository.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
from slicer_module_source import MODULE_DIR, ROOT, SOURCES

RAW_FILES = "https://raw.githubusercontent.com/"
#: s4ext keyword → CMake variable: the fields the extension build generates from CMakeLists.txt.
FROM_CMAKE = {
    "homepage": "EXTENSION_HOMEPAGE",
    "contributors": "EXTENSION_CONTRIBUTORS",
    "description": "EXTENSION_DESCRIPTION",
    "iconurl": "EXTENSION_ICONURL",
    "screenshoturls": "EXTENSION_SCREENSHOTURLS",
    "depends": "EXTENSION_DEPENDS",
    "category": "EXTENSION_CATEGORY",
    "status": "EXTENSION_STATUS",
}
REQUIRED = (
    "scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
    "category", "iconurl", "status", "description", "screenshoturls", "enabled",
)  # fmt: skip


def parse_s4ext(text: str) -> dict[str, str]:
    """First token of each non-comment line is the keyword, the rest of the line its value."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, value = line.strip().partition(" ")
            assert keyword not in fields, f"{keyword} given twice"
            fields[keyword] = value.strip()
    return fields


_CMAKE_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[()]|[^\s()"#]+')


def cmake_commands(text: str) -> list[tuple[str, list[str]]]:
    """(command, arguments) of a CMake file without comments; enough for flat argument lists."""
    tokens = [t for t in _CMAKE_TOKEN.findall(text) if t[0] != "#"]
    commands, i = [], 0
    while i < len(tokens) - 1:
        if tokens[i + 1] == "(":
            end = tokens.index(")", i + 2)
            commands.append((tokens[i].lower(), tokens[i + 2 : end]))
            i = end + 1
        else:
            i += 1
    return commands


def set_variables(commands) -> dict[str, list[str]]:
    """Each ``set``'s values, quoted arguments unquoted (their escapes kept)."""

    def unquoted(argument: str) -> str:
        return argument[1:-1] if argument.startswith('"') else argument

    return {args[0]: [unquoted(a) for a in args[1:]] for name, args in commands if name == "set"}


@pytest.fixture(scope="module")
def s4ext() -> dict[str, str]:
    return parse_s4ext((ROOT / "DeepRegister.s4ext").read_text())


@pytest.fixture(scope="module")
def cmake() -> dict[str, str]:
    """The top-level CMakeLists.txt's variables, as CMake holds them (lists ;-separated)."""
    variables = set_variables(cmake_commands((ROOT / "CMakeLists.txt").read_text()))
    return {name: ";".join(values) for name, values in variables.items()}


def test_the_parsers_read_the_formats() -> None:
    assert parse_s4ext("# c\nscm git\n\ndescription Two words\nstatus \n") == {
        "scm": "git", "description": "Two words", "status": "",
    }  # fmt: skip
    commands = cmake_commands(
        'set(A "x (y) \\"z\\"") # note\nset(B NA) # c\n  # set(C "no")\nf(D\n e)'
    )
    assert commands == [("set", ["A", '"x (y) \\"z\\""']), ("set", ["B", "NA"]), ("f", ["D", "e"])]
    assert set_variables(commands) == {"A": ['x (y) \\"z\\"'], "B": ["NA"]}


def test_the_description_file_has_every_field_with_a_value(s4ext: dict[str, str]) -> None:
    assert set(s4ext) == set(REQUIRED)
    assert all(s4ext[keyword] for keyword in REQUIRED), "no field may be blank"
    assert s4ext["scm"] == "git"
    assert s4ext["scmrevision"] == "main"
    assert s4ext["build_subdirectory"] == "."
    assert s4ext["enabled"] == "1"


def test_the_description_file_agrees_with_cmakelists(s4ext, cmake) -> None:
    assert {"EXTENSION_HOMEPAGE", "EXTENSION_DESCRIPTION", "EXTENSION_DEPENDS"} <= set(cmake)
    compared = [keyword for keyword, variable in FROM_CMAKE.items() if variable in cmake]
    assert len(compared) >= 6
    for keyword in compared:
        # CMake lists are ;-separated, the index's space-separated.
        assert s4ext[keyword] == cmake[FROM_CMAKE[keyword]].replace(";", " "), keyword
    assert s4ext["depends"] == "PyTorch"


def test_the_category_is_the_modules(s4ext: dict[str, str]) -> None:
    module = (MODULE_DIR / "DeepRegister.py").read_text()
    categories = re.search(r"parent\.categories = \[(.*)\]", module)
    assert categories is not None
    assert f'"{s4ext["category"]}"' in categories[1]


def test_the_urls_name_this_repository_and_files_that_exist(s4ext: dict[str, str]) -> None:
    repository = s4ext["scmurl"].removesuffix(".git")
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", repository)
    assert s4ext["homepage"].split("#")[0] == repository
    owner_name = repository.removeprefix("https://github.com/")
    prefix = f"{RAW_FILES}{owner_name}/{s4ext['scmrevision']}/"
    for url in [s4ext["iconurl"], *s4ext["screenshoturls"].split()]:
        assert url.startswith(prefix), url
        assert (ROOT / url.removeprefix(prefix)).is_file(), url


def test_the_module_cmake_lists_name_existing_files():
    commands = cmake_commands((MODULE_DIR / "CMakeLists.txt").read_text())
    variables = set_variables(commands)
    module_name = variables["MODULE_NAME"][0]
    assert module_name == "DeepRegister"
    scripts = [s.replace("${MODULE_NAME}", module_name) for s in variables["MODULE_PYTHON_SCRIPTS"]]
    assert sorted(scripts) == sorted(str(p.relative_to(MODULE_DIR)) for p in SOURCES)
    for entry in variables["MODULE_PYTHON_RESOURCES"]:
        assert (MODULE_DIR / entry.replace("${MODULE_NAME}", module_name)).is_file(), entry
    build = next(args for name, args in commands if name == "slicermacrobuildscriptedmodule")
    assert "WITH_GENERIC_TESTS" in build
    unittest = next(args for name, args in commands if name == "slicer_add_python_unittest")
    assert unittest == ["SCRIPT", "${MODULE_NAME}.py"]


def test_the_extension_cmake_lists_are_complete():
    commands = cmake_commands((ROOT / "CMakeLists.txt").read_text())
    variables = set_variables(commands)
    assert ("project", ["DeepRegister"]) in commands
    for field in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert variables[f"EXTENSION_{field}"][0].strip(), field
    assert variables["EXTENSION_DEPENDS"] == ["PyTorch"]
    for url in variables["EXTENSION_ICONURL"] + variables["EXTENSION_SCREENSHOTURLS"]:
        assert (ROOT / url.split("/main/", 1)[1]).is_file(), url
    for name, args in commands:
        if name == "add_subdirectory":
            assert (ROOT / args[0] / "CMakeLists.txt").is_file()
    patterns = [
        args[-1] for name, args in commands if name == "file" and args[:1] == ["GLOB_RECURSE"]
    ]
    assert "DeepRegisterLib/*.py" in patterns  # recursive: every package
    assert sorted(ROOT.glob("DeepRegisterLib/**/*.py")), "nothing for ctkMacroCompilePythonScript"
    compile_ = next(args for name, args in commands if name == "ctkmacrocompilepythonscript")
    assert "NO_INSTALL_SUBDIR" in compile_
    assert compile_[compile_.index("SOURCE_DIR") + 1] == "${CMAKE_CURRENT_SOURCE_DIR}"
    included = [args[0] for name, args in commands if name == "include"]
    assert included[-2:] == ["${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"]


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize(
    "icon",
    [
        MODULE_DIR / "Resources" / "Icons" / "DeepRegister.png",
        ROOT / "Resources" / "DeepRegister.png",
    ],
)
def test_icons_are_128_pixel_pngs(icon):
    assert _png_size(icon) == (128, 128)


def test_the_requirements_leave_slicers_own_packages_alone():
    lines = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    packages = [re.split(r"[<>=!~\[; ]", line.strip())[0].lower() for line in lines]
    packages = [p for p in packages if p and not p.startswith("#")]
    assert not set(packages) & {"torch", "simpleitk", "vtk", "numpy", "slicer", "slicer-core"}
