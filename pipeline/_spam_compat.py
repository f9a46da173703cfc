"""The one place where spam 0.9.1's rough edges are worked around.

Every call into spam from :mod:`pipeline` goes through :func:`spam_call`, which
handles the problems found in spam 0.9.1 (each checked here, see
``docs/dic.md``):

* spam modules call ``multiprocessing.set_start_method("fork")`` at import and
  every field function (``ldic``, ``interpolatePhiField``,
  ``estimateLocalQuadraticCoherency``, ``FfieldRegularQ8``,
  ``decomposeFfield`` ...) opens a ``multiprocessing.Pool``, even for one
  process. Forking a process that holds threads (pytest's, Dask's, rich's
  progress refresher) is what made ``ldic`` hang under pytest, and a Pool cannot
  be opened at all inside a daemonic Dask worker. With one process (or inside
  a daemonic process) :func:`spam_call` swaps the ``multiprocessing`` name in
  spam's modules for :class:`_SerialPool`, which runs the same per-node
  closures in this process: identical results, no fork.
* spam prints rich progress bars and tables to stdout; :func:`spam_call`
  captures them (they are logged at DEBUG level), keeping our logs and CLI
  output clean.
* ``spam.datasets`` needs ``import importlib.resources`` first
  (:func:`load_snow`).
* ``FfieldRegularGeers`` is wrong on boundary nodes (a scalar ``dot`` where an
  outer product is needed), so :mod:`pipeline.strain` uses
  ``FfieldRegularQ8`` only.
* Windows reaching past the volume edge are zero-padded by
  ``spam.helpers.slicePadded`` and may "converge" to absurd displacements;
  :mod:`pipeline.dic` builds grids whose windows lie inside the volume and
  rejects nodes whose displaced windows leave it.
* ``applyPhiField`` takes minutes on 128³ (a KD-tree query per voxel); the
  residual maps use :func:`pipeline.dic.deform_with_field`, a
  ``scipy.ndimage.map_coordinates`` path tested equal to spam's on a small case.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.resources  # noqa: F401  (spam.datasets needs it imported; see load_snow)
import io
import logging
import multiprocessing
import os
import sys
import types
from collections.abc import Iterator

import numpy as np

log = logging.getLogger("pipeline.spam")

# spam's modules that open a multiprocessing.Pool in the functions we call.
_POOL_MODULES = (
    "spam.DIC.ldic",
    "spam.DIC.kinematics",
    "spam.DIC.deform",
    "spam.deformation.deformationField",
)


class _SerialPool:
    """Drop-in for ``multiprocessing.Pool`` that runs ``imap_unordered`` in this process.

    spam defines its per-node workers as closures published through ``global``
    so that forked children find them; calling them directly here gives the
    same results without forking.
    """

    def __init__(self, processes: int | None = None, *args, **kwargs):
        self.processes = 1

    def __enter__(self) -> _SerialPool:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def imap_unordered(self, function, iterable, chunksize: int = 1):
        return map(function, iterable)

    def imap(self, function, iterable, chunksize: int = 1):
        return map(function, iterable)

    def map(self, function, iterable, chunksize: int | None = None):
        return list(map(function, iterable))

    def close(self) -> None:
        return None

    def join(self) -> None:
        return None


_SERIAL_MULTIPROCESSING = types.SimpleNamespace(Pool=_SerialPool, cpu_count=lambda: 1)


def resolve_processes(requested: int | None) -> int:
    """Number of processes spam may use: ``requested`` (default all CPUs), 1 inside a daemonic process."""
    if multiprocessing.current_process().daemon:
        return 1  # a daemonic process (a Dask worker) may not have children
    n = requested if requested is not None else (os.cpu_count() or 1)
    return max(1, int(n))


def _import_spam() -> None:
    for name in _POOL_MODULES:
        importlib.import_module(name)


@contextlib.contextmanager
def spam_call(processes: int, what: str) -> Iterator[None]:
    """Run spam code quietly, in this process when ``processes == 1``.

    Parameters
    ----------
    processes
        What will be passed to spam as ``processes``/``nProcesses``.
    what
        Name of the call, for the DEBUG log of spam's captured output.
    """
    _import_spam()
    saved = {}
    if processes <= 1:
        for name in _POOL_MODULES:
            module = sys.modules[name]
            saved[name] = module.multiprocessing
            module.multiprocessing = _SERIAL_MULTIPROCESSING
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield
    finally:
        for name, original in saved.items():
            sys.modules[name].multiprocessing = original
        text = buffer.getvalue().strip()
        if text:
            log.debug("%s printed:\n%s", what, text)


def load_snow() -> np.ndarray:
    """spam's bundled real tomography of snow (100³ uint16), an independent test volume."""
    import spam.datasets

    return spam.datasets.loadSnow()
