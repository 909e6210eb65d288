"""Fitting spatial chunks of a cube on a ``dask.distributed`` cluster.

:func:`dask_mapper` yields a ``mapper(fn, tasks)`` for :func:`klever_nb.fitting.fit_cube`
(``mapper=``): every chunk task runs on a worker, which reads its own chunk of a lazily
read cube from the file (:class:`klever_nb.fitting.cube.CubeLoader`), with a progress bar.
Each spaxel's fit depends only on its own data (and the whole-map fallback kinematics,
computed between the passes in this process), so the maps equal the serial ones whatever
the chunking and the number of workers.

Failures end in one :class:`~klever_nb.errors.KleverError` line: an unreachable scheduler,
a worker that dies (after dask's own retries), a task that raises.

References
----------
Issue 20.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterator

from klever_nb.errors import InputError, KleverError

#: Seconds to wait for a scheduler given by address.
CONNECT_TIMEOUT_S = 10


@contextlib.contextmanager
def dask_mapper(scheduler: str, *, workers: int | None = None, progress: bool = True,
                allowed_failures: int | None = None) -> Iterator:
    """A chunk mapper on ``scheduler``: ``"local"`` (a LocalCluster of ``workers`` processes,
    one thread each; default 2) or a scheduler address (``tcp://host:8786``)."""
    try:
        import dask
        from dask.distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover - dask is a dependency
        raise InputError("--scheduler needs dask.distributed (pip install 'dask[distributed]')"
                         ) from None
    if workers is not None and int(workers) < 1:
        raise InputError(f"--workers {workers}: need >= 1")
    config = {"distributed.scheduler.allowed-failures": allowed_failures} \
        if allowed_failures is not None else {}
    cluster = None
    with dask.config.set(config), warnings.catch_warnings():
        try:
            if scheduler == "local":
                warnings.filterwarnings("ignore", message=".*already in use")  # port 8787
                cluster = LocalCluster(n_workers=int(workers or 2), threads_per_worker=1,
                                       processes=True, dashboard_address=None,
                                       silence_logs=50)
                client = Client(cluster)
            else:
                client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError, ValueError) as err:
            if cluster is not None:
                cluster.close()
            raise InputError(f"--scheduler {scheduler}: no dask scheduler answered within "
                             f"{CONNECT_TIMEOUT_S} s ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); start one "
                             "(dask scheduler) or use --scheduler local") from None
        try:
            yield _Mapper(client, progress)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()


class _Mapper:
    def __init__(self, client, progress: bool):
        self.client = client
        self.progress = progress
        self.calls = 0

    def __call__(self, fn, tasks):
        from dask.distributed import as_completed

        self.calls += 1
        if not tasks:
            return []
        futures = [self.client.submit(fn, *task, pure=False) for task in tasks]
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(futures), desc=f"fit pass {self.calls}", unit="chunk",
                       file=sys.stderr, leave=False)
        try:
            for future in as_completed(futures):
                if future.status == "error":
                    break
                if bar is not None:
                    bar.update(1)
            return self.client.gather(futures)
        except KleverError:
            raise
        except Exception as err:  # KilledWorker, CommClosedError, a task's own error
            name = type(err).__name__
            what = ("a dask worker died while fitting" if "Killed" in name or "Comm" in name
                    else "a chunk failed on a dask worker")
            raise KleverError(f"{what} ({name}: {str(err).splitlines()[0] if str(err) else ''}"
                              "); nothing was written") from None
        finally:
            if bar is not None:
                bar.close()
            for future in futures:
                future.release()
