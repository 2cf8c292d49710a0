"""The exceptions visionzoo raises for things a user can fix.

Each message names the thing that is wrong and how to fix it, in one line. The
CLI prints the message (no traceback) and exits with the class's `exit_code`.
"""
from __future__ import annotations


class VisionZooError(Exception):
    """Base class of every user-facing visionzoo error."""

    exit_code = 1


class UnknownModelError(VisionZooError, LookupError):
    """A model or architecture name that the registry does not know."""


class UnknownWeightsError(VisionZooError, LookupError):
    """A weights tag that the architecture does not publish."""


class WeightsUnavailableError(VisionZooError):
    """Weights that are registered but cannot be obtained (not cached, no network, bad download)."""


class CheckpointError(VisionZooError):
    """A weights file that cannot be read or does not fit the model."""


class ImageError(VisionZooError):
    """A file that is not a readable image (missing, empty, truncated, not an image)."""

    def __init__(self, path: object, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class VideoError(ImageError):
    """A file that is not a readable video (corrupt, truncated, no video stream, no frames)."""


class InputError(VisionZooError, ValueError):
    """An invalid argument or input path."""


class TrainingError(VisionZooError):
    """A training run that cannot go on: the loss diverged, or a checkpoint does not match the run."""


class MissingDependencyError(VisionZooError, ImportError):
    """An optional package a feature needs is not installed; the message names the extra to install."""


class OutputBusyError(VisionZooError):
    """An output that another run is writing (it holds the output's lock); the message names that run."""


class ExportError(VisionZooError):
    """An exported model that cannot be written or does not reproduce the PyTorch model's outputs."""


def check_at_least(name: str, value: object, minimum: int, *, optional: bool = False, note: str = "") -> None:
    """Raise `InputError` unless `value` is an integer >= `minimum` (or None, when `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}{note}, got {value!r}")
