"""The project's few domain exceptions and the CLI exit code each maps to.

Exit codes are part of the CLI contract (ARCHITECTURE.md): 0 success,
2 invalid input, 3 a stage not available here or not built yet, 1 anything else.
"""

from __future__ import annotations


class TwinError(Exception):
    """Base class of every error the twin raises on purpose."""

    exit_code = 1


class ScenarioError(TwinError, ValueError):
    """An invalid scenario or ``--set`` override.

    ``problems`` holds one ``"field.path: what is wrong, got value"`` line per
    problem, so callers can show all of them at once.
    """

    exit_code = 2

    def __init__(self, problems: list[str] | str, source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        head = f"invalid scenario {source}" if source else "invalid scenario"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


class InputFileError(TwinError, ValueError):
    """A data file (NXtomo, TIFF, TSV, model, cache entry) that cannot be used."""

    exit_code = 2

    def __init__(self, path, reason: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {reason}")


class StageNotAvailable(TwinError):
    """A stage that is not built yet, or needs something this machine lacks."""

    exit_code = 3


class StageError(TwinError):
    """A stage that failed while running; names the stage and the item."""

    exit_code = 1
