"""Checks of the Slicer module that run without the Slicer application.

The module imports qt, ctk and slicer.ScriptedLoadableModule, which exist only inside Slicer, so it
is read as source (ast) and its .ui as XML: the bindings between both, the metadata the generic
Slicer test requires, the CMake file lists, and the contract with DeepRegisterLib. Its functions
that need none of Slicer's GUI run here, compiled from that source.
"""

from __future__ import annotations

import ast
import importlib
import re
import struct
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "DeepRegister"
SOURCE = MODULE_DIR / "DeepRegister.py"
PARTS = MODULE_DIR / "DeepRegisterModuleLib"  # the module's other files
SOURCES = [SOURCE, *sorted(PARTS.glob("*.py"))]
UI_FILE = MODULE_DIR / "Resources" / "UI" / "DeepRegister.ui"

# What parameterNodeWrapper's GUI connectors accept (Slicer's guiConnectors.py): widget class →
# the kind of field it can represent.
WIDGET_KINDS = {
    "qMRMLNodeComboBox": "node",
    "QCheckBox": "bool",
    "QSpinBox": "int",
    "QDoubleSpinBox": "float",
    "QComboBox": "choice",
    "QLineEdit": "str",
}


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


@pytest.fixture(scope="module")
def module() -> ast.Module:
    """Every file of the module as one: the checks below ask where a name is used, not in which
    file it is defined."""
    return ast.Module([n for path in SOURCES for n in _parse(path).body], type_ignores=[])


@pytest.fixture(scope="module")
def ui() -> ET.ElementTree:
    return ET.parse(UI_FILE)


def _aliases(module: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``Name = <type expression>`` assignments."""
    return {
        node.targets[0].id: node.value
        for node in module.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }


def _class(module: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == name)


def _parameter_fields(module: ast.Module) -> dict[str, ast.expr]:
    """Annotated fields of the class decorated with @parameterNodeWrapper, aliases resolved."""
    (wrapped,) = [
        node
        for node in module.body
        if isinstance(node, ast.ClassDef)
        and any(
            isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list
        )
    ]
    aliases = _aliases(module)
    return {
        node.target.id: aliases.get(ast.unparse(node.annotation), node.annotation)
        for node in wrapped.body
        if isinstance(node, ast.AnnAssign)
    }


def _kind(annotation: ast.expr) -> str:
    """node / bool / int / float / str / choice, as far as the GUI connectors are concerned."""
    text = ast.unparse(annotation)
    if text.startswith("Annotated["):
        base = ast.unparse(annotation.slice.elts[0])
        if base == "str" and "Choice(" in text:
            return "choice"
        return base
    if re.fullmatch(r"vtkMRML\w+|Union\[(vtkMRML\w+, )+None\]", text):
        return "node"
    return text


def _node_classes(annotation: ast.expr) -> set[str]:
    return set(re.findall(r"vtkMRML\w+", ast.unparse(annotation)))


def _library_imports(module: ast.Module) -> dict[str, str]:
    """Module-level ``from DeepRegisterLib... import name`` → the module it comes from."""
    return {
        alias.name: node.module
        for node in module.body
        if isinstance(node, ast.ImportFrom) and node.module.startswith("DeepRegisterLib")
        for alias in node.names
    }


def _choices(module: ast.Module, annotation: ast.expr) -> list[str]:
    """A Choice's values, with the names the module imports from the library resolved."""
    (call,) = [n for n in ast.walk(annotation) if isinstance(n, ast.Call) and n.func.id == "Choice"]
    names = {
        name: getattr(importlib.import_module(source), name)
        for name, source in _library_imports(module).items()
    }
    expression = compile(ast.Expression(call.args[0]), "<Choice>", "eval")
    return eval(expression, {"__builtins__": {"list": list}, **names})  # our own source


def _function(module: ast.Module, class_name: str, name: str) -> ast.FunctionDef:
    return next(
        n
        for n in _class(module, class_name).body
        if isinstance(n, ast.FunctionDef) and n.name == name
    )


def _attributes_read(function: ast.FunctionDef, owner: str) -> set[str]:
    return {
        n.attr
        for n in ast.walk(function)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == owner
    }


def _bound_widgets(ui: ET.ElementTree) -> dict[str, tuple[str, str]]:
    """parameter name → (widget class, widget name) for widgets with SlicerParameterName."""
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                parameter = prop.find("string").text
                assert prop.get("stdset") == "0", f"{parameter}: must be a dynamic property"
                assert parameter not in bound, f"{parameter} is bound to two widgets"
                bound[parameter] = (widget.get("class"), widget.get("name"))
    return bound


def _widget_names(ui: ET.ElementTree) -> set[str]:
    return {w.get("name") for w in ui.iter("widget")}


def _string_property(widget: ET.Element, name: str) -> list[str]:
    prop = next((p for p in widget.findall("property") if p.get("name") == name), None)
    return [] if prop is None else [s.text for s in prop.iter("string")]


# --- the module source --------------------------------------------------------------------


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: path.name)
def test_the_module_compiles(path):
    compile(path.read_text(encoding="utf-8"), str(path), "exec")


def test_the_module_has_the_scripted_module_anatomy(module):
    classes = {
        n.name: [ast.unparse(b) for b in n.bases]
        for n in module.body
        if isinstance(n, ast.ClassDef)
    }
    assert classes["DeepRegister"] == ["ScriptedLoadableModule"]
    assert classes["DeepRegisterWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["DeepRegisterLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["DeepRegisterTest"] == ["ScriptedLoadableModuleTest"]
    assert "DeepRegisterParameterNode" in classes


def test_the_module_file_holds_the_module_and_widget_and_names_its_test():
    """Slicer loads each .py beside DeepRegister.py as a module, and finds <Module>Test (for
    Reload and Test, and ctest) in DeepRegister.py's namespace."""
    assert sorted(p.name for p in MODULE_DIR.glob("*.py")) == ["DeepRegister.py"]
    main = _parse(SOURCE)
    defined = {n.name for n in main.body if isinstance(n, ast.ClassDef)}
    assert defined == {"DeepRegister", "DeepRegisterWidget"}
    imported = {
        alias.name: node.module
        for node in main.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert imported["DeepRegisterTest"] == "DeepRegisterModuleLib.selfTest"
    assert imported["DeepRegisterLogic"] == "DeepRegisterModuleLib.logic"
    for path in SOURCES[1:]:  # no second module for Slicer to find
        bases = [ast.unparse(b) for n in ast.walk(_parse(path)) if isinstance(n, ast.ClassDef)
                 for b in n.bases]  # fmt: skip
        assert "ScriptedLoadableModule" not in bases, path.name


def _parent_assignments(module) -> dict[str, ast.expr]:
    init = next(n for n in _class(module, "DeepRegister").body if isinstance(n, ast.FunctionDef))
    return {
        node.targets[0].attr: node.value
        for node in ast.walk(init)
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Attribute)
        and ast.unparse(node.targets[0].value) == "self.parent"
    }


def _strings(node: ast.expr) -> str:
    return " ".join(
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    )


def test_the_module_metadata_is_complete_and_translatable(module):
    meta = _parent_assignments(module)
    for field in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert _strings(meta[field]).strip(), f"{field} is empty (the generic Slicer test fails)"
    assert _strings(meta["title"]) == "Deep Register"
    assert "Registration" in _strings(meta["categories"])
    for field in ("title", "helpText", "acknowledgementText"):
        assert isinstance(meta[field], ast.Call)
        assert ast.unparse(meta[field].func) == "_"
    assert "translate(" in ast.unparse(meta["categories"])
    assert '<a href="https://' in _strings(meta["helpText"])
    acknowledgement = _strings(meta["acknowledgementText"])
    for citation in (
        "VoxelMorph",
        "Balakrishnan",
        "Dalca",
        "SynthMorph",
        "Hoffmann",
        "SimpleITK",
        "ITK",
    ):
        assert citation in acknowledgement


def test_torch_and_the_library_are_imported_only_inside_functions(module):
    top_level = set()
    for node in module.body:
        if isinstance(node, ast.Import):
            top_level |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            top_level.add(node.module)
    library = {name for name in top_level if name.startswith("DeepRegisterLib")}
    assert library <= {
        "DeepRegisterLib.registration.presets",
        "DeepRegisterLib.registration.settings",
    }
    assert not {name.split(".")[0] for name in top_level} & {
        "torch", "PyTorchUtils", "SimpleITK", "numpy"
    }  # fmt: skip
    # What the module imports at load time must stay cheap: no torch, no slicer.
    code = f"import sys; import {', '.join(sorted(library))}; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_reload_reloads_every_other_file_after_those_it_imports(module):
    reload = _function(module, "DeepRegisterWidget", "onReload")
    (loop,) = [n for n in ast.walk(reload) if isinstance(n, ast.For)]
    order = ast.literal_eval(loop.iter)
    assert sorted(order) == sorted(p.stem for p in SOURCES[1:] if p.stem != "__init__")
    for position, name in enumerate(order):
        imported = {
            n.module for n in ast.walk(_parse(PARTS / f"{name}.py"))
            if isinstance(n, ast.ImportFrom) and n.level == 1
        }  # fmt: skip
        assert imported <= set(order[:position]), name
    assert ast.unparse(reload.body[-1]) == "ScriptedLoadableModuleWidget.onReload(self)"


def test_a_loaded_scene_gets_our_transforms_linear_interpolation_back(module, tmp_path):
    """The module's own code, run on a slicer-core scene standing in for slicer.mrmlScene: at
    startup it observes scene loads, and a load sets our grid transforms back to linear."""
    mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core
    from DeepRegisterLib import mrml

    init = ast.unparse(_function(module, "DeepRegister", "__init__"))
    assert "slicer.app.connect('startupCompleted()', _watchSceneLoads)" in init
    hooks = [
        n
        for n in module.body
        if isinstance(n, ast.FunctionDef) and n.name in ("_watchSceneLoads", "_onSceneLoaded")
    ]
    saved = mrml_scenes._new_scene(tmp_path / "cache").scene
    fixed, moving = mrml_scenes._pair(saved)
    pushed = mrml.pushResult(mrml_scenes._hand_made_result(fixed, moving), fixed, moving)
    assert saved.WriteToMRB(str(tmp_path / "scene.mrb"))
    scene = mrml_scenes._new_scene(tmp_path / "cache2").scene
    namespace = {"slicer": types.SimpleNamespace(mrmlScene=scene)}
    exec(compile(ast.Module(hooks, type_ignores=[]), str(SOURCE), "exec"), namespace)

    namespace["_watchSceneLoads"]()
    assert scene.ReadFromMRB(str(tmp_path / "scene.mrb"))

    loaded = scene.GetFirstNodeByName(pushed.transformNode.GetName())
    assert loaded.GetTransformFromParent().GetInterpolationMode() == 1  # VTK's linear


def test_the_library_path_is_added_only_when_the_library_is_not_importable(module):
    function = next(
        n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "_addLibraryToPath"
    )
    source = ast.unparse(function)
    assert "find_spec('DeepRegisterLib')" in source
    assert "sys.path.append" in source


# --- the .ui and its bindings --------------------------------------------------------------


def test_the_ui_is_a_qmrmlwidget_with_unique_widget_names(ui):
    root = ui.getroot()
    assert root.findtext("class") == "DeepRegister"
    top = root.find("widget")
    assert (top.get("class"), top.get("name")) == ("qMRMLWidget", "DeepRegister")
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names))
    sections = {
        w.findtext("property/string")
        for w in root.iter("widget")
        if w.get("class") == "ctkCollapsibleButton"
    }
    assert {"Inputs", "Outputs", "Advanced", "Results"} <= sections


def test_every_bound_widget_names_a_parameter_and_every_parameter_has_a_widget(module, ui):
    fields = _parameter_fields(module)
    bound = _bound_widgets(ui)
    assert set(bound) == set(fields)


def test_bound_widgets_can_represent_their_parameters(module, ui):
    fields = _parameter_fields(module)
    for parameter, (widget_class, widget_name) in _bound_widgets(ui).items():
        assert WIDGET_KINDS[widget_class] == _kind(fields[parameter]), (
            f"{widget_name} ↔ {parameter}"
        )
        if widget_class == "qMRMLNodeComboBox":
            widget = next(w for w in ui.iter("widget") if w.get("name") == widget_name)
            assert set(_string_property(widget, "nodeTypes")) == _node_classes(fields[parameter])


def test_node_unions_are_written_with_typing_union(module):
    """parameterNodeWrapper recognises typing.Union only (``A | B`` is types.UnionType)."""
    for name, annotation in _parameter_fields(module).items():
        assert not any(isinstance(n, ast.BinOp) for n in ast.walk(annotation)), name


def test_every_ui_widget_the_module_uses_exists(module, ui):
    used = {
        node.attr
        for node in ast.walk(module)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "ui"
    }
    assert used, "no self.ui.<widget> found: the parser is out of date"
    assert used <= _widget_names(ui)


def test_every_node_selector_is_given_the_scene(ui):
    selectors = {w.get("name") for w in ui.iter("widget") if w.get("class") == "qMRMLNodeComboBox"}
    connected = {
        c.findtext("receiver")
        for c in ui.iter("connection")
        if c.findtext("sender") == "DeepRegister"
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    assert selectors
    assert selectors <= connected


def test_the_apply_button_log_and_progress_widgets_exist(ui):
    classes = {w.get("name"): w.get("class") for w in ui.iter("widget")}
    assert classes["applyButton"] == "QPushButton"
    assert classes["progressBar"] == "QProgressBar"
    assert classes["logTextEdit"] == "QPlainTextEdit"


# --- the contract with DeepRegisterLib -------------------------------------------------------


def test_preset_and_similarity_choices_are_the_librarys(module):
    from DeepRegisterLib.registration.presets import PRESETS
    from DeepRegisterLib.registration.settings import DEVICES, SIMILARITIES

    fields = _parameter_fields(module)
    assert _choices(module, fields["preset"]) == list(PRESETS)
    assert _choices(module, fields["similarity"]) == ["default", *SIMILARITIES]
    assert _choices(module, fields["device"]) == list(DEVICES)
    # The library's own lists, not copies of them.
    assert {"PRESETS", "SIMILARITIES", "DEVICES"} <= set(_library_imports(module))


def test_the_preset_tooltip_quotes_each_presets_description(ui):
    # The .ui file cannot read the library, so its tooltip repeats the descriptions: keep them one.
    from DeepRegisterLib.registration.presets import PRESETS

    combo = ui.find(".//widget[@name='presetComboBox']")
    tooltip = combo.find("property[@name='toolTip']/string").text
    for name, preset in PRESETS.items():
        assert re.search(rf"\b{name}\b[^;]*: {re.escape(preset.description)}", tooltip), name


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def test_one_function_maps_every_setting_the_gui_offers_to_registration_settings(module):
    from DeepRegisterLib.registration.settings import field_names

    fields = _parameter_fields(module)
    offered = {name for name in fields if _snake_case(name) in field_names()}
    assert offered >= {"preset", "similarity", "iterations", "computeInverse", "device"}
    mapping = _function(module, "DeepRegisterLogic", "settingsFromParameterNode")
    assert _attributes_read(mapping, "parameterNode") == offered
    (call,) = [
        n
        for n in ast.walk(mapping)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == "RegistrationSettings"
    ]
    keywords = {k.arg for k in call.keywords if k.arg is not None}
    optional = {
        n.slice.value
        for n in ast.walk(mapping)
        if isinstance(n, ast.Subscript) and ast.unparse(n.value) == "optional"
    }
    assert keywords | optional == {_snake_case(name) for name in offered}


def test_starting_a_run_reads_every_other_parameter(module):
    fields = _parameter_fields(module)
    others = {name for name in fields if _kind(fields[name]) == "node"} | {"createOutputVolume"}
    start = _function(module, "DeepRegisterLogic", "startRegistration")
    assert _attributes_read(start, "p") == others
    assert "settingsFromParameterNode" in ast.unparse(start)


def test_the_module_runs_registrations_in_a_child_process_not_a_thread(module):
    source = ast.unparse(module)
    assert "RegistrationProcess(" in source
    assert "threading" not in source
    assert "Thread" not in source


def test_the_next_runs_child_waits_while_the_module_is_open_and_ends_when_it_is_left(module):
    def calls(name: str) -> str:
        return ast.unparse(_function(module, "DeepRegisterWidget", name))

    assert "self.logic.startStandbyChild()" in calls("enter")
    assert "self.logic.finishRegistration(task)" in calls("_showOutcome")
    # After each run, and only once its results are pushed (or it failed or was cancelled): a
    # child loading PyTorch beside the push slows it on two cores.
    (after,) = [
        node
        for node in ast.walk(_function(module, "DeepRegisterWidget", "_onPollTimer"))
        if isinstance(node, ast.Try)
    ]
    assert [ast.unparse(n) for n in after.body] == ["self._showOutcome(task)"]
    assert "self.logic.startStandbyChild()" in "\n".join(map(ast.unparse, after.finalbody))
    for name in ("exit", "cleanup"):
        assert "self.logic.endStandbyChild()" in calls(name)
    start = ast.unparse(_function(module, "DeepRegisterLogic", "startStandbyChild"))
    assert "if not torchIsUsable():" in start  # none before a usable PyTorch is installed
    assert "mrml.startStandby(mrml.childPython())" in start


def test_the_help_states_the_slicer_and_torch_versions(module):
    help_text = _strings(_parent_assignments(module)["helpText"])
    assert "Slicer 5.10" in help_text
    minimum = next(
        ast.literal_eval(n.value)
        for n in module.body
        if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "MINIMUM_TORCH_VERSION"
    )
    assert minimum == "2.5"  # torch.OutOfMemoryError, which the engine catches
    assert f"PyTorch {minimum}" in help_text


def _run_here(path: Path, names: set[str], **namespace) -> dict:
    """The named top-level functions and constants of one of the module's files, compiled from
    its source into ``namespace`` (the Slicer imports they would need left out)."""
    chosen = [
        n
        for n in _parse(path).body
        if (isinstance(n, ast.FunctionDef) and n.name in names)
        or (isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) in names)
    ]
    assert len(chosen) == len(names)
    exec(compile(ast.Module(chosen, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def test_torch_versions_are_compared_by_major_and_minor_number():
    setup = _run_here(
        PARTS / "pytorchSetup.py",
        {"MINIMUM_TORCH_VERSION", "torchVersionIsEnough", "installedTorchVersion", "torchIsUsable"},
        importlib=importlib,
        re=re,
    )
    enough = setup["torchVersionIsEnough"]
    assert [enough(v) for v in ("2.5.0", "2.13.0+cpu", "2.10", "3.0.1")] == [True] * 4
    assert [enough(v) for v in ("2.4.1+cu121", "1.13.1", "nightly")] == [False] * 3
    import torch  # the one this suite runs on

    assert setup["installedTorchVersion"]() == torch.__version__
    assert setup["torchIsUsable"]()


def test_the_summary_reads_a_real_report_and_leaves_out_what_it_lacks():
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
    from DeepRegisterLib.registration.engine import register

    pair = phantom_pair(demo_grid(2, 32), amplitude_mm=2.0)
    report = register(
        pair.fixed, pair.moving, preset="fast", iterations=5, device="cpu",
        moving_labels={"labels": pair.moving_labels}, fixed_labels=pair.fixed_labels,
    ).report  # fmt: skip
    summary = _run_here(PARTS / "resultViews.py", {"reportSummary"}, _=str)["reportSummary"]
    lines = summary(report).splitlines()
    assert lines[0] == f"Time: {report['runtime_s']:.1f} s on cpu, preset fast."
    assert f"{report['folding_percent']:.3f} %" in lines[1]
    assert f"{report['sdlogj']:.3f}" in lines[1]
    assert lines[2] == (
        f"Similarity (global NCC): {report['ncc_before']:.3f} before, "
        f"{report['ncc_affine']:.3f} after affine, {report['ncc_after']:.3f} after."
    )
    assert lines[3] == f"Mean Dice: {report['mean_dice']:.3f}."
    assert summary({"runtime_s": 2.0, "notes": ["ran on the CPU"]}).splitlines() == [
        "Time: 2.0 s on ?, preset ?.",
        "Note: ran on the CPU.",
    ]


def test_the_moving_volume_is_refused_as_output_volume(module):
    reasons = ast.unparse(_function(module, "DeepRegisterWidget", "_whyCannotApply"))
    assert "parameters.outputVolume == parameters.movingVolume" in reasons


# --- build files and resources ------------------------------------------------------------


_CMAKE_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|#[^\n]*|[()]|[^\s()"#]+')


def _cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, arguments) of a CMake file without comments; enough for flat argument lists."""
    tokens = [t for t in _CMAKE_TOKEN.findall(path.read_text(encoding="utf-8")) if t[0] != "#"]
    commands, i = [], 0
    while i < len(tokens) - 1:
        if tokens[i + 1] == "(":
            end = tokens.index(")", i + 2)
            commands.append((tokens[i].lower(), tokens[i + 2 : end]))
            i = end + 1
        else:
            i += 1
    return commands


def _set_variables(commands) -> dict[str, list[str]]:
    return {args[0]: [a.strip('"') for a in args[1:]] for name, args in commands if name == "set"}


def test_the_module_cmake_lists_name_existing_files():
    commands = _cmake_commands(MODULE_DIR / "CMakeLists.txt")
    variables = _set_variables(commands)
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
    commands = _cmake_commands(ROOT / "CMakeLists.txt")
    variables = _set_variables(commands)
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


# --- the package -----------------------------------------------------------------------------


def test_importing_the_package_does_not_import_slicer():
    code = "import sys, DeepRegisterLib; print('slicer' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
