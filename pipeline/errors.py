"""One exception hierarchy. Every message names what was wrong, the value, and the fix."""

from __future__ import annotations


class MPMError(Exception):
    """Root of every error this package raises on purpose."""


class ConfigError(MPMError, ValueError):
    """The run configuration is invalid (a key, its value, and how to fix it)."""


class InputDataError(MPMError, ValueError):
    """An input file or layer cannot be used as it is."""


class LayerError(InputDataError):
    """A named layer is unusable; the message starts with the layer name."""

    def __init__(self, layer: str, problem: str, fix: str):
        self.layer = layer
        self.problem = problem
        self.fix = fix
        super().__init__(f"layer {layer!r}: {problem}. Fix: {fix}")


class CubeError(MPMError, ValueError):
    """A cube store is missing, incomplete or inconsistent."""


class CheckpointError(MPMError, ValueError):
    """A model checkpoint is corrupt or does not match the cube."""


class LockError(MPMError, RuntimeError):
    """Another run holds the output folder's lock (the message names it: pid, host, command)."""


class DependencyError(MPMError, ImportError):
    """An optional dependency is missing."""


def require(module: str, purpose: str):
    """Import an optional dependency lazily, with an actionable message if it is absent."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - message tested via a fake module name
        raise DependencyError(
            f"{purpose} needs the optional package {module!r}, which is not installed. "
            f"Fix: pip install {module.split('.')[0]}"
        ) from exc
