"""One exception family for everything numgpt reports to a user.

Every error a user can cause (a bad flag, a broken file, a malformed request) is a
``NumGPTError``; the subclasses say which boundary it came through. ``ConfigError``,
``InputError`` and ``ShapeError`` are also ``ValueError`` (``DTypeError`` is a ``TypeError``) so callers that already catch
``ValueError`` keep working. ``assert`` is used only for internal invariants.
"""

__all__ = ["NumGPTError", "ConfigError", "InputError", "ShapeError", "DTypeError", "CheckpointError"]


class NumGPTError(Exception):
    """Base class of every error numgpt raises on purpose."""


class ConfigError(NumGPTError, ValueError):
    """A configuration key is unknown, has the wrong type, or an impossible value."""


class InputError(NumGPTError, ValueError):
    """Data handed to numgpt (text, ids, a request) cannot be used as given."""


class ShapeError(NumGPTError, ValueError):
    """Arrays given to an op have shapes the math does not allow; names both shapes."""


class DTypeError(NumGPTError, TypeError):
    """Arrays given to an op have a dtype it cannot use (integers, or mixed float widths)."""


class CheckpointError(NumGPTError):
    """A checkpoint file or folder is missing, corrupt, or of the wrong format."""
