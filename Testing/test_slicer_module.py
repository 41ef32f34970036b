"""Checks of the Slicer module that run without the Slicer application.

The module imports qt, ctk and slicer.ScriptedLoadableModule, which exist only inside Slicer, so it
is read as source (ast) and its .ui as XML: the bindings between both, the metadata the generic
Slicer test requires, and the contract with DeepRegisterLib. Its functions that need none of
Slicer's GUI run here, compiled from that source. The .ui's checks are in test_slicer_module_ui.py,
the build files' in test_extension_metadata.py.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
from slicer_module_source import (
    MODULE_DIR,
    PARTS,
    ROOT,
    SOURCE,
    SOURCES,
    attributes_read,
    choices,
    kind,
    library_imports,
    method_node,
    parameter_fields,
    parent_assignments,
    parse_file,
    snake_case,
    strings,
    whole_module,
)  # fmt: skip


@pytest.fixture(scope="module")
def module() -> ast.Module:
    return whole_module()


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
    main = parse_file(SOURCE)
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
        bases = [ast.unparse(b) for n in ast.walk(parse_file(path)) if isinstance(n, ast.ClassDef)
                 for b in n.bases]  # fmt: skip
        assert "ScriptedLoadableModule" not in bases, path.name


def test_the_module_metadata_is_complete_and_translatable(module):
    meta = parent_assignments(module)
    for field in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert strings(meta[field]).strip(), f"{field} is empty (the generic Slicer test fails)"
    assert strings(meta["title"]) == "Deep Register"
    assert "Registration" in strings(meta["categories"])
    for field in ("title", "helpText", "acknowledgementText"):
        assert isinstance(meta[field], ast.Call)
        assert ast.unparse(meta[field].func) == "_"
    assert "translate(" in ast.unparse(meta["categories"])
    assert '<a href="https://' in strings(meta["helpText"])
    acknowledgement = strings(meta["acknowledgementText"])
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
    reload = method_node(module, "DeepRegisterWidget", "onReload")
    (loop,) = [n for n in ast.walk(reload) if isinstance(n, ast.For)]
    order = ast.literal_eval(loop.iter)
    assert sorted(order) == sorted(p.stem for p in SOURCES[1:] if p.stem != "__init__")
    for position, name in enumerate(order):
        imported = {
            n.module for n in ast.walk(parse_file(PARTS / f"{name}.py"))
            if isinstance(n, ast.ImportFrom) and n.level == 1
        }  # fmt: skip
        assert imported <= set(order[:position]), name
    assert ast.unparse(reload.body[-1]) == "ScriptedLoadableModuleWidget.onReload(self)"


def test_a_loaded_scene_gets_our_transforms_linear_interpolation_back(module, tmp_path):
    """The module's own code, run on a slicer-core scene standing in for slicer.mrmlScene: at
    startup it observes scene loads, and a load sets our grid transforms back to linear."""
    mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core
    from DeepRegisterLib import mrml

    init = ast.unparse(method_node(module, "DeepRegister", "__init__"))
    assert "slicer.app.connect('startupCompleted()', _watchSceneLoads)" in init
    saved = mrml_scenes._new_scene(tmp_path / "cache").scene
    fixed, moving = mrml_scenes._pair(saved)
    pushed = mrml.pushResult(mrml_scenes._hand_made_result(fixed, moving), fixed, moving)
    assert saved.WriteToMRB(str(tmp_path / "scene.mrb"))
    scene = mrml_scenes._new_scene(tmp_path / "cache2").scene
    hooks = _run_here(
        SOURCE,
        {"_watchSceneLoads", "_onSceneLoaded"},
        slicer=types.SimpleNamespace(mrmlScene=scene),
    )

    hooks["_watchSceneLoads"]()
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


# --- the contract with DeepRegisterLib -------------------------------------------------------


def test_preset_and_similarity_choices_are_the_librarys(module):
    from DeepRegisterLib.registration.presets import PRESETS
    from DeepRegisterLib.registration.settings import DEVICES, SIMILARITIES

    fields = parameter_fields(module)
    assert choices(module, fields["preset"]) == list(PRESETS)
    assert choices(module, fields["similarity"]) == ["default", *SIMILARITIES]
    assert choices(module, fields["device"]) == list(DEVICES)
    # The library's own lists, not copies of them.
    assert {"PRESETS", "SIMILARITIES", "DEVICES"} <= set(library_imports(module))


def test_one_function_maps_every_setting_the_gui_offers_to_registration_settings(module):
    from DeepRegisterLib.registration.settings import field_names

    fields = parameter_fields(module)
    offered = {name for name in fields if snake_case(name) in field_names()}
    assert offered >= {"preset", "similarity", "iterations", "computeInverse", "device"}
    mapping = method_node(module, "DeepRegisterLogic", "settingsFromParameterNode")
    assert attributes_read(mapping, "parameterNode") == offered
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
    assert keywords | optional == {snake_case(name) for name in offered}


def test_starting_a_run_reads_every_other_parameter(module):
    fields = parameter_fields(module)
    others = {name for name in fields if kind(fields[name]) == "node"} | {"createOutputVolume"}
    start = method_node(module, "DeepRegisterLogic", "startRegistration")
    assert attributes_read(start, "p") == others
    assert "settingsFromParameterNode" in ast.unparse(start)


def test_the_module_runs_registrations_in_a_child_process_not_a_thread(module):
    source = ast.unparse(module)
    assert "RegistrationProcess(" in source
    assert "threading" not in source
    assert "Thread" not in source


def test_the_next_runs_child_waits_while_the_module_is_open_and_ends_when_it_is_left(module):
    def calls(name: str) -> str:
        return ast.unparse(method_node(module, "DeepRegisterWidget", name))

    assert "self.logic.startStandbyChild()" in calls("enter")
    assert "self.logic.finishRegistration(task)" in calls("_showOutcome")
    # After each run, and only once its results are pushed (or it failed or was cancelled): a
    # child loading PyTorch beside the push slows it on two cores.
    (after,) = [
        node
        for node in ast.walk(method_node(module, "DeepRegisterWidget", "_onPollTimer"))
        if isinstance(node, ast.Try)
    ]
    assert [ast.unparse(n) for n in after.body] == ["self._showOutcome(task)"]
    assert "self.logic.startStandbyChild()" in "\n".join(map(ast.unparse, after.finalbody))
    for name in ("exit", "cleanup"):
        assert "self.logic.endStandbyChild()" in calls(name)
    start = ast.unparse(method_node(module, "DeepRegisterLogic", "startStandbyChild"))
    assert "if not torchIsUsable():" in start  # none before a usable PyTorch is installed
    assert "mrml.startStandby(mrml.childPython())" in start


def test_the_help_states_the_slicer_and_torch_versions(module):
    help_text = strings(parent_assignments(module)["helpText"])
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
        for n in parse_file(path).body
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
    reasons = ast.unparse(method_node(module, "DeepRegisterWidget", "_whyCannotApply"))
    assert "parameters.outputVolume == parameters.movingVolume" in reasons


def test_apply_waits_for_an_output_volume_of_the_moving_volumes_kind(module):
    """A colour moving volume warps into a colour (vector) output: Apply stays disabled with
    the library's reason while the output selector holds a scalar volume (test_mrml_colour
    tests the rule itself)."""
    reasons = ast.unparse(method_node(module, "DeepRegisterWidget", "_whyCannotApply"))
    assert "checkOutputVolumeKind(parameters.movingVolume, parameters.outputVolume)" in reasons
    pytest.importorskip("mrml_scenes")  # the library's MRML half needs slicer-core
    from DeepRegisterLib import mrml

    assert callable(mrml.checkOutputVolumeKind)


# --- the package -----------------------------------------------------------------------------


def test_importing_the_package_does_not_import_slicer():
    code = "import sys, DeepRegisterLib; print('slicer' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
