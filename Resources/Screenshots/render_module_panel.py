"""Render DeepRegister.ui outside Slicer, as it looks mid-run, for the README.

Slicer's own widget classes are swapped for their plain Qt look-alikes (node selectors become
combo boxes holding example node names, collapsible buttons become group boxes), so the
picture shows the real layout without the Slicer application. Needs PySide6 (not a
dependency of DeepRegister):

    QT_QPA_PLATFORM=offscreen python Resources/Screenshots/render_module_panel.py
"""

import sys
from pathlib import Path
from xml.etree import ElementTree

from PySide6.QtCore import QBuffer, QByteArray, QIODevice
from PySide6.QtUiTools import QUiLoader
from PySide6.QtWidgets import (
    QApplication,
    QCheckBox,
    QComboBox,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
)

HERE = Path(__file__).resolve().parent
UI = HERE.parents[1] / "DeepRegister" / "Resources" / "UI" / "DeepRegister.ui"
EXAMPLE_NODES = {
    "fixedVolumeSelector": "MRBrainTumor1",
    "movingVolumeSelector": "MRBrainTumor2",
    "fixedMaskSelector": "None",
    "movingMaskSelector": "None",
    "movingLabelsSelector": "MRBrainTumor2-segmentation",
    "initialTransformSelector": "None",
    "outputTransformSelector": "Create new transform",
    "outputVolumeSelector": "Create new volume",
    "presetComboBox": "balanced",
    "deviceComboBox": "auto",
    "similarityComboBox": "default (local NCC)",
}
CHECKED = ("createOutputVolumeCheckBox", "computeJacobianCheckBox", "affineCheckBox")
LOG = """[00:00.2] inputs checked (fixed 256x256x112, moving 256x256x112)
[00:01.0] affine: rigid then affine, Mattes MI
[00:05.8] network grid 2 mm, 88x104x64
[00:06.4] optimising at 4 mm (50 steps)
[00:11.9] optimising at 2 mm"""


def plain_qt(text: str) -> bytes:
    root = ElementTree.fromstring(text)
    swaps = {"qMRMLNodeComboBox": "QComboBox", "qMRMLWidget": "QWidget"}
    for widget in root.iter("widget"):
        kind = widget.get("class")
        if kind == "ctkCollapsibleButton":
            widget.set("class", "QGroupBox")
            for prop in widget.findall("property"):  # its "text" is a group box's "title"
                if prop.get("name") == "text":
                    prop.set("name", "title")
        elif kind in swaps:
            widget.set("class", swaps[kind])
    return ElementTree.tostring(root)


def main() -> None:
    app = QApplication(sys.argv)
    data = QByteArray(plain_qt(UI.read_text()))
    buffer = QBuffer(data)
    buffer.open(QIODevice.ReadOnly)
    panel = QUiLoader().load(buffer)
    for name, node in EXAMPLE_NODES.items():
        panel.findChild(QComboBox, name).addItem(node)
    for name in CHECKED:
        panel.findChild(QCheckBox, name).setChecked(True)
    panel.findChild(QPushButton, "applyButton").setText("Cancel")
    panel.findChild(QPushButton, "applyButton").setEnabled(True)
    progress = panel.findChild(QProgressBar, "progressBar")
    progress.setValue(63)
    progress.setFormat("63 %  optimising at 2 mm")
    panel.findChild(QPlainTextEdit, "logTextEdit").setPlainText(LOG)
    panel.resize(440, 980)
    panel.show()
    app.processEvents()
    panel.grab().save(str(HERE / "module-panel.png"))


if __name__ == "__main__":
    main()
