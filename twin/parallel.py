"""Parallel execution on dask.distributed.

One way to run things side by side everywhere in the twin (the nodes of a
run's or a sweep's DAG): :func:`executor` yields an executor that submits jobs
to a Dask ``Client`` as soon as their inputs are ready. With ``run.workers ==
1`` and no scheduler it runs them in the calling process, which keeps
tracebacks and tests simple.

``run.scheduler`` names an existing scheduler (``tcp://host:8786``): that is
how a sweep goes past one machine. Workers must see the same cache directory
(a shared file system) because stages exchange files, not arrays.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

from twin.scenario import Run

log = logging.getLogger("twin.parallel")


class SerialExecutor:
    """Runs submitted jobs in this process, one at a time, when they are waited for: highest priority first."""

    def __init__(self):
        self._queued: dict[Future, tuple[int, int, Callable, tuple]] = {}
        self._count = itertools.count()

    def submit(self, function: Callable, *args, priority: int = 0) -> Future:
        future: Future = Future()
        self._queued[future] = (-priority, next(self._count), function, args)
        return future

    def first_done(self, futures: Iterable[Future]) -> set[Future]:
        futures = list(futures)
        done = {f for f in futures if f.done()}
        if done:
            return done
        future = min(futures, key=lambda f: self._queued[f][:2])
        _, _, function, args = self._queued.pop(future)
        try:
            future.set_result(function(*args))
        except BaseException as exc:  # noqa: BLE001 (handed to whoever asks for the result)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            future.set_exception(exc)
        return {future}

    def cancel(self, futures: Iterable[Future]) -> None:
        for future in futures:
            self._queued.pop(future, None)


class DaskExecutor:
    """Jobs as Dask futures; a higher ``priority`` is scheduled first."""

    def __init__(self, client):
        self.client = client

    def submit(self, function: Callable, *args, priority: int = 0):
        return self.client.submit(function, *args, pure=False, priority=priority)

    def first_done(self, futures: Iterable) -> set:
        from dask.distributed import wait

        return set(wait(list(futures), return_when="FIRST_COMPLETED").done)

    def cancel(self, futures: Iterable) -> None:
        self.client.cancel(list(futures))


Executor = SerialExecutor | DaskExecutor


@contextlib.contextmanager
def executor(run: Run) -> Iterator[Executor]:
    """Yield an executor: ``submit(function, *args, priority=0)``, ``first_done(futures)``, ``cancel(futures)``.

    ``first_done`` blocks until at least one of the futures has finished and
    returns the finished ones; ``future.result()`` returns a job's value or
    raises its exception. With ``run.workers == 1`` and no scheduler the jobs
    run in this process, one at a time, highest priority first.
    """
    if run.workers == 1 and run.scheduler is None:
        yield SerialExecutor()
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
        yield DaskExecutor(client)
