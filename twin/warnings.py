"""Warnings for problems that do not stop a run (tests turn them into errors)."""


class TwinWarning(UserWarning):
    """Base of the twin's own warnings, e.g. a propagator that aliases."""
