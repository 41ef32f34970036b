"""All-or-nothing scene changes: a failed push leaves the scene exactly as it was."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import slicer


class SceneEdit:
    """Adds and changes nodes so that an exception part-way puts the scene back as it was.

    New nodes (with their display nodes) are removed; existing nodes are restored from a copy
    taken just before their first change.
    """

    def __init__(self, scene: slicer.vtkMRMLScene):
        self.scene = scene
        self._before: set[str] = set()
        self._backups: list[tuple[Any, Any]] = []

    def __enter__(self) -> SceneEdit:
        self._before = set(_nodeIDs(self.scene))
        self.scene.StartState(slicer.vtkMRMLScene.BatchProcessState)
        return self

    def __exit__(self, excType, exc, traceback) -> None:
        try:
            if excType is not None:
                for node, backup in reversed(self._backups):
                    node.Copy(backup)
                for nodeID in reversed(list(_nodeIDs(self.scene))):
                    node = self.scene.GetNodeByID(nodeID)  # None if removed with its owner
                    if nodeID not in self._before and node is not None:
                        self.scene.RemoveNode(node)
        finally:
            self.scene.EndState(slicer.vtkMRMLScene.BatchProcessState)

    def newNode(self, className: str, name: str):
        return self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))

    def change(self, node):
        """Call before the first change of a node that may already exist; returns the node."""
        if node.GetID() in self._before and all(n is not node for n, _ in self._backups):
            backup = node.CreateNodeInstance()
            backup.Copy(node)
            self._backups.append((node, backup))
        return node

    def reuseOrNew(self, owner, role: str, className: str, name: str):
        """The node ``owner`` references under ``role`` if it is a ``className``, else a new one."""
        node = owner.GetNodeReference(role)
        if node is not None and node.IsA(className):
            return self.change(node)
        return self.newNode(className, name)


def _nodeIDs(scene: slicer.vtkMRMLScene) -> Iterator[str]:
    for index in range(scene.GetNumberOfNodes()):
        yield scene.GetNthNode(index).GetID()
