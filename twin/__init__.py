"""twin: a digital twin of in situ X-ray nano-holotomography of Si anodes.

The public entry points are :func:`twin.scenario.load_scenario` (a validated
scenario), :class:`twin.runner.Runner` (the cached stage runner) and the
``twin`` command line (:mod:`twin.cli`).
"""

from twin.errors import InputFileError, ScenarioError, StageError, StageNotAvailable

__version__ = "0.1.0"

__all__ = ["InputFileError", "ScenarioError", "StageError", "StageNotAvailable", "__version__"]
