"""PyTorch for the module: it comes from the PyTorch extension and is checked before any run,
so that no run fails half-way for a missing or old torch."""

import importlib.metadata
import re

from slicer.i18n import tr as _

#: DeepRegisterLib catches torch.OutOfMemoryError (new in torch 2.5); everything else it calls is
#: older.
MINIMUM_TORCH_VERSION = "2.5"


def installedTorchVersion() -> str:
    return importlib.metadata.version("torch")


def torchVersionIsEnough(version: str) -> bool:
    """Whether a torch version string ("2.13.0+cpu") is at least MINIMUM_TORCH_VERSION."""

    def majorMinor(text: str) -> tuple[int, int]:
        match = re.match(r"(\d+)\.(\d+)", text)
        return (int(match[1]), int(match[2])) if match else (0, 0)

    return majorMinor(version) >= majorMinor(MINIMUM_TORCH_VERSION)


def torchIsUsable() -> bool:
    """Whether an installed torch is recent enough, read from its metadata: importing torch
    takes a second or more."""
    try:
        return torchVersionIsEnough(installedTorchVersion())
    except importlib.metadata.PackageNotFoundError:
        return False


def setupPythonRequirements() -> bool:
    """Make a torch the library can use available, asking the user before installing or
    upgrading it; False if they declined."""
    try:
        import PyTorchUtils
    except ModuleNotFoundError as error:
        raise RuntimeError(
            _(
                "This module needs the PyTorch extension. Install it in the Extensions Manager "
                "and restart Slicer."
            )
        ) from error
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled() and torchIsUsable():
        return True
    torch = torchLogic.installTorch(
        askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}"
    )
    if torch is None:
        return False
    if not torchIsUsable():
        raise RuntimeError(
            _("PyTorch {installed} is installed; {minimum} or newer is needed.").format(
                installed=installedTorchVersion(), minimum=MINIMUM_TORCH_VERSION
            )
        )
    return True
