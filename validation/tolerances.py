"""Accuracy regression bounds: one TOML file of per-metric bounds, each with the value measured when set.

Format (``validation/tolerances.toml``)::

    [metrics."segmentation.dice_si.mean"]
    min = 0.90            # or max = ..., or both
    measured = 0.953      # the value when the bound was set
    note = "tiny, seed 20240607; bound = measured - 0.05"

Bounds are set from measured values with a stated margin and never loosened to
make a change pass: a change that worsens a metric past its bound fails with
the metric's name, its value and the bound.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from twin.errors import InputFileError


@dataclass(frozen=True)
class Bound:
    metric: str
    min: float | None
    max: float | None
    measured: float | None
    note: str = ""


def default_tolerances_path() -> Path:
    return Path(str(resources.files("validation").joinpath("tolerances.toml")))


def load_bounds(path: str | Path | None = None) -> list[Bound]:
    """Read the bounds file (default: the package's ``validation/tolerances.toml``)."""
    path = Path(path) if path else default_tolerances_path()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(path, f"cannot read tolerances ({exc})") from None
    bounds = []
    for metric, spec in data.get("metrics", {}).items():
        if not isinstance(spec, dict) or not ({"min", "max"} & set(spec)):
            raise InputFileError(path, f"metrics.{metric!r}: needs min and/or max")
        unknown = set(spec) - {"min", "max", "measured", "note"}
        if unknown:
            raise InputFileError(path, f"metrics.{metric!r}: unknown keys {sorted(unknown)}")
        bounds.append(Bound(metric, spec.get("min"), spec.get("max"), spec.get("measured"), spec.get("note", "")))
    return bounds


def violations(metrics: dict[str, float], bounds: list[Bound]) -> list[str]:
    """One line per bound that ``metrics`` breaks (a missing or NaN metric breaks its bound)."""
    problems = []
    for b in bounds:
        value = metrics.get(b.metric)
        when = f" (measured {b.measured:.4g} when set)" if b.measured is not None else ""
        if value is None or not math.isfinite(value):
            problems.append(f"{b.metric}: missing or not finite ({value!r}); bound {_describe(b)}{when}")
        elif b.min is not None and value < b.min:
            problems.append(f"{b.metric} = {value:.4g} is below its bound min = {b.min:.4g}{when}")
        elif b.max is not None and value > b.max:
            problems.append(f"{b.metric} = {value:.4g} is above its bound max = {b.max:.4g}{when}")
    return problems


def _describe(b: Bound) -> str:
    return " and ".join(f"{k} = {v:.4g}" for k, v in (("min", b.min), ("max", b.max)) if v is not None)
