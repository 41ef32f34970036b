"""The module's .ui, read as XML, against the module's source: every parameter has a widget
that can show it, every widget the code uses exists, and the library's choices reach the GUI."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET

import pytest
from slicer_module_source import (
    WIDGET_KINDS,
    bound_widgets,
    kind,
    node_classes,
    parameter_fields,
    string_property,
    ui_tree,
    whole_module,
    widget_names,
)


@pytest.fixture(scope="module")
def module() -> ast.Module:
    return whole_module()


@pytest.fixture(scope="module")
def ui() -> ET.ElementTree:
    return ui_tree()


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
    fields = parameter_fields(module)
    bound = bound_widgets(ui)
    assert set(bound) == set(fields)


def test_bound_widgets_can_represent_their_parameters(module, ui):
    fields = parameter_fields(module)
    for parameter, (widget_class, widget_name) in bound_widgets(ui).items():
        assert WIDGET_KINDS[widget_class] == kind(fields[parameter]), f"{widget_name} ↔ {parameter}"
        if widget_class == "qMRMLNodeComboBox":
            widget = next(w for w in ui.iter("widget") if w.get("name") == widget_name)
            assert set(string_property(widget, "nodeTypes")) == node_classes(fields[parameter])


def test_node_unions_are_written_with_typing_union(module):
    """parameterNodeWrapper recognises typing.Union only (``A | B`` is types.UnionType)."""
    for name, annotation in parameter_fields(module).items():
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
    assert used <= widget_names(ui)


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


def test_the_preset_tooltip_quotes_each_presets_description(ui):
    # The .ui file cannot read the library, so its tooltip repeats the descriptions: keep them one.
    from DeepRegisterLib.registration.presets import PRESETS

    combo = ui.find(".//widget[@name='presetComboBox']")
    tooltip = combo.find("property[@name='toolTip']/string").text
    for name, preset in PRESETS.items():
        assert re.search(rf"\b{name}\b[^;]*: {re.escape(preset.description)}", tooltip), name
