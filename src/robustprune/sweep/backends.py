"""Where a sweep's tasks run: in this process (the default), in local worker processes, as Ray tasks, or as a Slurm
job array through submitit. A backend only starts tasks; the folder's claims decide who does what
(``tasks.run_task``), and this process finishes whatever is left (``waves.py``), so every backend ends with the same
files. Missing extras and unreachable clusters are found by ``check`` before any work starts.

Threads: ``torch`` defaults to one intra-op thread per core in every process, so workers sharing a machine would each
take all of it (two default runs side by side on 2 cores run no faster than one after the other). Every worker gets
``cores // workers`` threads instead (at least 1).
"""
from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from robustprune.infra.errors import UserError
from robustprune.infra.runtime import threads_per_worker
from robustprune.sweep.tasks import Task, run_task

BACKENDS = ("local", "ray", "slurm")
REACH_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class BackendOptions:
    name: str = "local"  # local | ray | slurm
    workers: int = 1  # local: worker processes (1: this process only); ray / slurm: tasks at once (0: no cap)
    address: str | None = None  # ray: the cluster (None: a local one)
    slurm: dict[str, Any] = field(default_factory=dict)  # submitit's parameters (slurm_partition, timeout_min, ...)
    gpus: int = 0  # ray: GPUs each task asks for (slurm: ``gpus_per_node`` in ``slurm``)

    def threads(self) -> int:
        """Intra-op threads per worker: an equal share of this machine's cores."""
        return threads_per_worker(self.workers)


class Started:
    """Tasks handed to a backend; ``done()`` once none of them can still be running."""

    def __init__(self, done: Callable[[], bool] = lambda: True, close: Callable[[], None] = lambda: None):
        self.done, self.close = done, close


def check(options: BackendOptions) -> None:
    """Refuse, before any work, a backend that cannot start: a bad worker count, a missing extra, an unreachable Ray
    cluster."""
    if options.name not in BACKENDS:
        raise UserError(f"unknown backend {options.name!r} (choose from: {', '.join(BACKENDS)})")
    if options.workers < 0 or (options.name == "local" and options.workers < 1):
        raise UserError(f"--workers must be >= 1, got {options.workers}")
    if options.gpus < 0:
        raise UserError(f"--gpus-per-task must be >= 0, got {options.gpus}")
    if options.name == "ray":
        _ray(options)
    if options.name == "slurm":
        _submitit()


def start(folder: Path, tasks: list[Task], options: BackendOptions) -> Started:
    if options.name == "ray":
        return _start_ray(folder, tasks, options)
    if options.name == "slurm":
        return _start_slurm(folder, tasks, options)
    if options.workers > 1:
        return _start_local(folder, tasks, options)
    return Started()  # in this process: the wave's own loop does every task


def _start_local(folder: Path, tasks: list[Task], options: BackendOptions) -> Started:
    pool = concurrent.futures.ProcessPoolExecutor(options.workers, mp_context=multiprocessing.get_context("spawn"))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    futures = [pool.submit(run_task, str(folder), task, threads=options.threads(),
                           device=f"cuda:{i % gpus}" if gpus else None) for i, task in enumerate(tasks)]
    return Started(lambda: all(f.done() for f in futures), lambda: pool.shutdown(wait=True, cancel_futures=True))


def _ray(options: BackendOptions):
    try:
        import ray
    except ImportError:
        raise UserError("the ray backend needs the optional extra: pip install 'robustprune[ray]'") from None
    if not ray.is_initialized():
        _reachable(options.address)
        try:
            # Ray's start-up notices (a local instance started, token authentication) are not ours to print
            ray.init(address=options.address, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise UserError(f"cannot reach the Ray cluster at {options.address}: {err}".splitlines()[0]) from None
    return ray


def _reachable(address: str | None) -> None:
    """A plain TCP connection to a given Ray address first: ``ray.init`` retries an unreachable one for minutes."""
    if address in (None, "auto", "local"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except ValueError:
        raise UserError(f"--address must be HOST:PORT, got {address!r}") from None
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at {address}: {err.strerror or err}") from None


def _start_ray(folder: Path, tasks: list[Task], options: BackendOptions) -> Started:
    ray = _ray(options)
    threads = options.threads() if options.workers else 1
    remote = ray.remote(num_cpus=threads, num_gpus=options.gpus)(run_task)
    refs = [remote.remote(str(folder), task, threads=threads) for task in tasks]
    return Started(lambda: len(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) == len(refs))


def _submitit():
    try:
        import submitit
    except ImportError:
        raise UserError("the slurm backend needs the optional extra: pip install 'robustprune[slurm]'") from None
    return submitit


def _start_slurm(folder: Path, tasks: list[Task], options: BackendOptions) -> Started:
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=folder / "slurm", cluster=options.slurm.get("cluster"))
    threads = int(options.slurm.get("cpus_per_task", 1))
    parameters = {k: v for k, v in options.slurm.items() if k not in ("cluster", "cpus_per_task")}
    executor.update_parameters(cpus_per_task=threads, slurm_array_parallelism=options.workers or len(tasks),
                               **parameters)
    jobs = executor.map_array(_slurm_task, [str(folder)] * len(tasks), tasks, [threads] * len(tasks))
    return Started(lambda: all(job.done() for job in jobs))


def _slurm_task(folder: str, task: Task, threads: int) -> bool:
    return run_task(folder, task, threads=threads)
