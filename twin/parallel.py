"""Parallel execution on dask.distributed.

One way to run things side by side everywhere in the twin (scans, slabs of
slices, sweep points): :func:`executor` yields a ``map(function, list_of_args)``
backed by a Dask ``Client``. With ``run.workers == 1`` and no scheduler it runs
in the calling process, which keeps tracebacks and tests simple.

``run.scheduler`` names an existing scheduler (``tcp://host:8786``): that is
how a sweep goes past one machine. Workers must see the same cache directory
(a shared file system) because stages exchange files, not arrays.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

from twin.scenario import Run

log = logging.getLogger("twin.parallel")

MapFunction = Callable[[Callable, list], list]


def _serial(function: Callable, jobs: list) -> list:
    return [function(*args) for args in jobs]


@contextlib.contextmanager
def executor(run: Run) -> Iterator[MapFunction]:
    """Yield ``map(function, jobs)`` that calls ``function(*args)`` for each ``args`` in ``jobs``.

    Results come back in the order of ``jobs``; the first exception raised by a
    job is raised here (the other jobs' finished outputs stay valid in the cache).
    """
    if run.workers == 1 and run.scheduler is None:
        yield _serial
        return
    from dask.distributed import Client, LocalCluster

    with contextlib.ExitStack() as stack:
        if run.scheduler is not None:
            client = stack.enter_context(Client(run.scheduler, timeout="30s"))
            log.info("using Dask scheduler %s", run.scheduler)
        else:
            cluster = stack.enter_context(
                LocalCluster(n_workers=run.workers, threads_per_worker=1, processes=True,
                             dashboard_address=None, silence_logs=logging.WARNING)
            )
            client = stack.enter_context(Client(cluster))
            log.info("started a LocalCluster of %d workers", run.workers)

        def dask_map(function: Callable, jobs: list) -> list:
            futures = [client.submit(function, *args, pure=False) for args in jobs]
            return client.gather(futures)

        yield dask_map
