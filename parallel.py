"""Servers for many images at once: in this process, or Dask workers (local or a cluster).

    with fhe_servers(server_dir, eval_keys, workers=2, threads_per_worker=1) as submit:
        future = submit(ciphertext_bytes)      # -> (result bytes, server seconds)

Each Dask worker receives server.zip and the evaluation keys once, through a worker plugin
(a worker that joins or restarts later gets them too), then only ciphertext bytes per task.
The driver keeps the client and its secret key. A task whose worker dies is run again on
another worker by the scheduler; `retries` covers a task that raised.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
from pathlib import Path

from distributed.diagnostics.plugin import WorkerPlugin

from deployment import FHEServer

PLUGIN = "fhe-server"


class ServerPlugin(WorkerPlugin):
    """The server side of one deployed model on a Dask worker: server.zip and evaluation keys
    as bytes (what is sent), loaded once per worker process."""

    name = PLUGIN

    def __init__(self, server_zip: bytes, eval_keys: bytes):
        self.server_zip, self.eval_keys = server_zip, eval_keys
        self.server = self.keys = None

    def __getstate__(self):  # only the bytes travel
        return {"server_zip": self.server_zip, "eval_keys": self.eval_keys}

    def __setstate__(self, state):
        self.__init__(state["server_zip"], state["eval_keys"])

    def setup(self, worker):
        d = Path(worker.local_directory) / PLUGIN
        d.mkdir(parents=True, exist_ok=True)
        (d / "server.zip").write_bytes(self.server_zip)
        self.server = FHEServer(d)
        self.keys = FHEServer.load_keys(self.eval_keys)


def serve(payload: bytes) -> tuple[bytes, float]:
    """A worker's task: run the encrypted part on one ciphertext."""
    from distributed import get_worker

    plugin = get_worker().plugins[PLUGIN]
    return plugin.server.run(payload, plugin.keys)


def dask_client(workers: int, threads_per_worker: int, scheduler: str | None):
    """A Dask client: on the cluster at `scheduler`, else on a new local cluster of `workers`
    processes, each with one task at a time and Concrete's runtime limited to
    threads_per_worker threads (OMP_NUM_THREADS, set before the worker imports Concrete)."""
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler)
    cluster = LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
        env={"OMP_NUM_THREADS": str(threads_per_worker)}, silence_logs=logging.ERROR,
    )
    return Client(cluster)


@contextlib.contextmanager
def fhe_servers(server_dir, eval_keys: bytes, workers: int = 0, threads_per_worker: int = 0,
                scheduler: str | None = None, sent: list | None = None):
    """Yield submit(payload bytes) -> concurrent.futures.Future of (result bytes, seconds).

    workers 0 and no scheduler: one server in this process (a thread, so that the client
    encrypts the next image meanwhile). Otherwise Dask workers. `sent`, when given, collects
    every object handed to the workers (for tests that check no secret crosses)."""
    if not workers and not scheduler:
        server = FHEServer(server_dir)
        keys = FHEServer.load_keys(eval_keys)
        with cf.ThreadPoolExecutor(1) as pool:
            yield lambda payload: pool.submit(server.run, payload, keys)
        return
    plugin = ServerPlugin((Path(server_dir) / "server.zip").read_bytes(), eval_keys)
    if sent is not None:
        sent.append(plugin.__getstate__())
    client = dask_client(workers, threads_per_worker, scheduler)
    try:
        client.register_plugin(plugin)
        executor = client.get_executor(pure=False, retries=2)

        def submit(payload: bytes):
            if sent is not None:
                sent.append(payload)
            return executor.submit(serve, payload)

        submit.dask_client = client  # for callers that manage the cluster (tests kill a worker)
        yield submit
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()
