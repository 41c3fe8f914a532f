"""Every error headstart raises. Each also inherits the builtin it refines."""

from __future__ import annotations

from pathlib import Path


class HeadstartError(Exception):
    """Base class: a problem the user can fix; the message says how."""


class DataError(HeadstartError, ValueError):
    """The data folder or CSV cannot be used as given."""


class UnreadableImageError(HeadstartError, OSError):
    """An image file could not be decoded."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnknownBackboneError(HeadstartError, KeyError):
    """A backbone name that is neither registered nor a timm model."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class BackboneWeightsError(HeadstartError, OSError):
    """Pretrained weights could not be downloaded or loaded."""


class BundleError(HeadstartError, ValueError):
    """A model folder is missing, malformed, or unsafe to load."""


class ConfigError(HeadstartError, ValueError):
    """An option value outside what it accepts."""


class FileRefusedError(HeadstartError, OSError):
    """A path that headstart will not read: not a regular file (FIFO, device, folder), or too large."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[0])


class TFLiteConversionError(HeadstartError, RuntimeError):
    """The TFLite converter failed on a model; its log has been written to stderr."""


class ClusterError(HeadstartError, RuntimeError):
    """A Ray cluster could not finish a job (`extract --ray`, `predict --ray`)."""
