"""The Slicer module's source, read without Slicer: its files parsed as one (ast), its .ui as
XML, and the questions the module's tests ask of them."""

from __future__ import annotations

import ast
import importlib
import re
import xml.etree.ElementTree as ET
from pathlib import Path

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


def parse_file(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def whole_module() -> ast.Module:
    """Every file of the module as one: the tests ask where a name is used, not in which file it
    is defined."""
    return ast.Module([n for path in SOURCES for n in parse_file(path).body], type_ignores=[])


def ui_tree() -> ET.ElementTree:
    return ET.parse(UI_FILE)


def _aliases(module: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``Name = <type expression>`` assignments."""
    return {
        node.targets[0].id: node.value
        for node in module.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }


def class_node(module: ast.Module, name: str) -> ast.ClassDef:
    return next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == name)


def parameter_fields(module: ast.Module) -> dict[str, ast.expr]:
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


def kind(annotation: ast.expr) -> str:
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


def node_classes(annotation: ast.expr) -> set[str]:
    return set(re.findall(r"vtkMRML\w+", ast.unparse(annotation)))


def library_imports(module: ast.Module) -> dict[str, str]:
    """Module-level ``from DeepRegisterLib... import name`` → the module it comes from."""
    return {
        alias.name: node.module
        for node in module.body
        if isinstance(node, ast.ImportFrom) and node.module.startswith("DeepRegisterLib")
        for alias in node.names
    }


def choices(module: ast.Module, annotation: ast.expr) -> list[str]:
    """A Choice's values, with the names the module imports from the library resolved."""
    (call,) = [n for n in ast.walk(annotation) if isinstance(n, ast.Call) and n.func.id == "Choice"]
    names = {
        name: getattr(importlib.import_module(source), name)
        for name, source in library_imports(module).items()
    }
    expression = compile(ast.Expression(call.args[0]), "<Choice>", "eval")
    return eval(expression, {"__builtins__": {"list": list}, **names})  # our own source


def method_node(module: ast.Module, class_name: str, name: str) -> ast.FunctionDef:
    return next(
        n
        for n in class_node(module, class_name).body
        if isinstance(n, ast.FunctionDef) and n.name == name
    )


def attributes_read(function: ast.FunctionDef, owner: str) -> set[str]:
    return {
        n.attr
        for n in ast.walk(function)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == owner
    }


def bound_widgets(ui: ET.ElementTree) -> dict[str, tuple[str, str]]:
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


def widget_names(ui: ET.ElementTree) -> set[str]:
    return {w.get("name") for w in ui.iter("widget")}


def string_property(widget: ET.Element, name: str) -> list[str]:
    prop = next((p for p in widget.findall("property") if p.get("name") == name), None)
    return [] if prop is None else [s.text for s in prop.iter("string")]


def parent_assignments(module) -> dict[str, ast.expr]:
    init = next(
        n for n in class_node(module, "DeepRegister").body if isinstance(n, ast.FunctionDef)
    )
    return {
        node.targets[0].attr: node.value
        for node in ast.walk(init)
        if isinstance(node, ast.Assign)
        and isinstance(node.targets[0], ast.Attribute)
        and ast.unparse(node.targets[0].value) == "self.parent"
    }


def strings(node: ast.expr) -> str:
    return " ".join(
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    )


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()
