"""The runner's error type: a user mistake or a bad file, reported in one line."""

from __future__ import annotations

__all__ = ["RunnerError"]


class RunnerError(ValueError):
    """A run cannot start or continue because of its input (options, output directory,
    checkpoint or data file). The message is one line that names the file or option and says
    how to proceed; ``kbfgs`` prints it without a traceback."""
