"""The ExtensionsIndex description (DeepRegister.s4ext) says what CMakeLists.txt says.

Slicer's extension build writes its own description from the ``EXTENSION_*`` variables of the
top-level CMakeLists.txt; the index entry is written by hand. Both are parsed here (no CMake) and
must agree, and the files the URLs name must exist in this repository.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
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


def parse_cmake_sets(text: str) -> dict[str, str]:
    """``set(NAME "value")`` / ``set(NAME value)`` at the start of a line; comments dropped."""
    pattern = re.compile(r'^set\((\w+)\s+(?:"((?:[^"\\]|\\.)*)"|([^)\s]*))\s*\)', re.MULTILINE)
    return {m[1]: m[2] if m[2] is not None else m[3] for m in pattern.finditer(text)}


@pytest.fixture(scope="module")
def s4ext() -> dict[str, str]:
    return parse_s4ext((ROOT / "DeepRegister.s4ext").read_text())


@pytest.fixture(scope="module")
def cmake() -> dict[str, str]:
    return parse_cmake_sets((ROOT / "CMakeLists.txt").read_text())


def test_the_parsers_read_the_formats() -> None:
    assert parse_s4ext("# c\nscm git\n\ndescription Two words\nstatus \n") == {
        "scm": "git", "description": "Two words", "status": "",
    }  # fmt: skip
    cmake = 'set(A "x (y) \\"z\\"") # note\nset(B NA) # c\n  # set(C "no")\n'
    assert parse_cmake_sets(cmake) == {"A": 'x (y) \\"z\\"', "B": "NA"}


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
    module = (ROOT / "DeepRegister" / "DeepRegister.py").read_text()
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


def test_the_icon_is_a_128_pixel_png(s4ext: dict[str, str]) -> None:
    icon = ROOT / s4ext["iconurl"].split("/main/", 1)[1]
    header = icon.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)
