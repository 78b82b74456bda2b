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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from distributed import as_completed
from distributed.diagnostics.plugin import WorkerPlugin
from tqdm import tqdm

from cli import UserError, opt
from deployment import FHEServer
from fhe import CompileOptions, to_concrete

PLUGIN = "fhe-server"
SIM_PLUGIN = "fhe-simulator"


@dataclass
class ParallelOptions(CompileOptions):
    """Compile options plus where the work runs: this process, local Dask workers, or a cluster."""

    workers: int = opt(0, "Dask worker processes on this machine (0: everything in this process)")
    threads_per_worker: int = opt(1, "Concrete runtime threads per Dask worker (OMP_NUM_THREADS)")
    scheduler: str | None = opt(None, "address of an existing Dask scheduler to use instead of local workers (tcp://host:8786)")

    def __post_init__(self):
        super().__post_init__()
        if self.workers < 0 or self.threads_per_worker < 1:
            raise UserError("--workers must be >= 0 and --threads-per-worker >= 1")
        if self.scheduler and self.workers:
            raise UserError("give --workers (a local cluster) or --scheduler (an existing one), not both")


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
    with dask_session(workers, threads_per_worker, scheduler) as client:
        client.register_plugin(plugin)
        executor = client.get_executor(pure=False, retries=2)

        def submit(payload: bytes):
            if sent is not None:
                sent.append(payload)
            return executor.submit(serve, payload)

        submit.dask_client = client  # for callers that manage the cluster (tests kill a worker)
        yield submit


@contextlib.contextmanager
def dask_session(workers: int, threads_per_worker: int, scheduler: str | None):
    """A Dask client (dask_client), closed afterwards with the local cluster it started."""
    client = dask_client(workers, threads_per_worker, scheduler)
    try:
        yield client
    finally:
        cluster = client.cluster
        client.close()
        if cluster is not None and not scheduler:
            cluster.close()


# ---------------------------------------------------------------- simulation on workers


class SimulatorPlugin(WorkerPlugin):
    """The encrypted part compiled on a worker, for fhe="simulate". The checkpoint file, the
    compile options and the calibration set travel; each worker compiles them itself, and
    compilation is deterministic, so every worker holds the same circuit as the driver."""

    name = SIM_PLUGIN

    def __init__(self, checkpoint: bytes, options: dict, calib: np.ndarray):
        self.checkpoint, self.options, self.calib = checkpoint, options, calib
        self.qm = None

    def __getstate__(self):
        return {"checkpoint": self.checkpoint, "options": self.options, "calib": self.calib}

    def __setstate__(self, state):
        self.__init__(**state)

    def setup(self, worker):
        from checkpoints import load_checkpoint
        from fhe import compile_model

        path = Path(worker.local_directory) / "simulated.pt"
        path.write_bytes(self.checkpoint)
        model, _ = load_checkpoint(path)
        self.qm = compile_model(model, self.calib, CompileOptions(**{**self.options, "checkpoint": str(path)}))


def simulate_chunk(feats: np.ndarray) -> np.ndarray:
    """A worker's task: one fresh simulation of a chunk of clear-part outputs."""
    from distributed import get_worker

    return get_worker().plugins[SIM_PLUGIN].qm.forward(to_concrete(feats), fhe="simulate")


class Simulators:
    """Draws of fhe="simulate" spread over Dask workers, in chunks of `batch` images; the
    chunks are sent once and reused by every draw."""

    def __init__(self, client, batch: int):
        self.client, self.batch = client, batch

    def compile(self, checkpoint, options: CompileOptions, calib: np.ndarray) -> None:
        """(Re)compile on every worker (a plugin of the same name replaces the previous one)."""
        self.client.register_plugin(SimulatorPlugin(Path(checkpoint).read_bytes(), asdict(options), to_concrete(calib)))

    def submit(self, feats: np.ndarray, repeats: int, desc: str = "simulate"):
        """Start `repeats` draws on the workers and return at once a function that waits for
        them and returns their logits, in order (the caller works meanwhile)."""
        chunks = self.client.scatter([feats[i : i + self.batch] for i in range(0, len(feats), self.batch)])
        futures = [[self.client.submit(simulate_chunk, c, pure=False, retries=2) for c in chunks] for _ in range(repeats)]

        def collect() -> list[np.ndarray]:
            flat = [f for draw in futures for f in draw]
            for _ in tqdm(as_completed(flat), total=len(flat), desc=f"{desc} x{repeats} on workers", leave=False):
                pass
            return [np.concatenate([f.result() for f in draw]) for draw in futures]

        return collect

    def draws(self, feats: np.ndarray, repeats: int, desc: str = "simulate") -> list[np.ndarray]:
        return self.submit(feats, repeats, desc)()


@contextlib.contextmanager
def simulators(o: ParallelOptions, batch: int):
    """Yield Simulators on the workers `o` asks for, or None to simulate in this process."""
    if not o.workers and not o.scheduler:
        yield None
        return
    with dask_session(o.workers, o.threads_per_worker, o.scheduler) as client:
        yield Simulators(client, batch)
