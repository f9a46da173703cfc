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
  closures in this process: identical results, no fork. With more processes
  it swaps in :class:`_WatchedPool`, which forks as spam expects but
  notices a worker that dies (killed, out of memory): ``multiprocessing.Pool``
  waits forever for the task such a worker held, which hung a sweep once. The
  tasks the dead worker took are computed again in this process.
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

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


class _WatchedPool:
    """Drop-in for spam's ``multiprocessing.Pool`` on a forking ``ProcessPoolExecutor``.

    ``multiprocessing.Pool`` replaces a worker that dies but loses the task it
    held, so ``imap_unordered`` never returns. The executor instead marks
    every unfinished task broken; those tasks are then computed here, in this
    process, by the same closure (spam publishes it as a module global before
    opening the pool, so this process has it too): the results are those of
    an undisturbed pool.
    """

    def __init__(self, processes: int | None = None, *args, **kwargs):
        self.processes = processes or os.cpu_count() or 1
        self._executor = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("fork"))

    def __enter__(self) -> _WatchedPool:
        return self

    def __exit__(self, *exc) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def imap_unordered(self, function, iterable, chunksize: int = 1):
        """The only Pool method spam 0.9.1 calls."""
        items = list(iterable)
        futures, lost = {}, []
        for i, item in enumerate(items):
            try:
                futures[self._executor.submit(function, item)] = i
            except BrokenProcessPool:  # a worker died while the tasks were being handed out
                lost.extend(range(i, len(items)))
                break
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                lost.append(futures[future])
                continue
            yield result
        if lost:
            log.warning("a spam pool worker died (killed or out of memory?): computing its %d unfinished "
                        "task(s) of %d in this process", len(lost), len(items))
            for i in sorted(lost):
                yield function(items[i])

    def close(self) -> None:
        return None

    def join(self) -> None:
        return None


_SERIAL_MULTIPROCESSING = types.SimpleNamespace(Pool=_SerialPool, cpu_count=lambda: 1)
_WATCHED_MULTIPROCESSING = types.SimpleNamespace(Pool=_WatchedPool, cpu_count=multiprocessing.cpu_count)


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
    pool = _SERIAL_MULTIPROCESSING if processes <= 1 else _WATCHED_MULTIPROCESSING
    for name in _POOL_MODULES:
        module = sys.modules[name]
        saved[name] = module.multiprocessing
        module.multiprocessing = pool
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
