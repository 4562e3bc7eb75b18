"""Where batch models and sweep configs run: in this process, in local worker processes, or as Ray tasks.

Every executor has ``map(fn, items, initializer=None, initargs=())``: an iterator of ``fn(item)`` in item
order, yielded as each is ready. As with ``multiprocessing.Pool``, ``initializer(*initargs)`` runs once in
each worker before its first item: that is where a worker builds expensive state (onnxruntime sessions).
``fn``, ``initializer`` and their arguments must be picklable (module-level functions, plain data). On a
Ray cluster, every machine must see the model files at the same paths (a shared filesystem).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from cp_onnx.errors import CpOnnxError

EXECUTORS = ("inprocess", "ray")
RAY_HINT = "pip install 'cp-onnx[ray]'"


class Executor(Protocol):
    threads_per_task: int | None  # onnxruntime threads each task should use (None: all cores)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], initializer: Callable | None = None,
            initargs: Sequence = ()) -> Iterator[Any]: ...


class InProcessExecutor:
    """Items one after another in this process (the default)."""

    threads_per_task: int | None = None

    def map(self, fn, items, initializer=None, initargs=()):
        if initializer is not None:
            initializer(*initargs)
        return map(fn, items)


class ProcessExecutor:
    """Items shared by ``num_workers`` local processes (spawned: onnxruntime's thread pools do not survive fork)."""

    def __init__(self, num_workers: int = 2):
        self.num_workers = _positive(num_workers, "workers")
        self.threads_per_task = max(1, (os.cpu_count() or 1) // self.num_workers)

    def map(self, fn, items, initializer=None, initargs=()):
        items = list(items)
        if not items:
            return
        context = multiprocessing.get_context("spawn")
        with context.Pool(min(self.num_workers, len(items)), initializer=initializer, initargs=tuple(initargs)) as pool:
            yield from pool.imap(fn, items)


class RayExecutor:
    """Each item a Ray task on one of ``num_workers`` actors (each holding its initialized state).

    Without ``address`` a local Ray runtime with ``num_workers * cpus_per_worker`` CPUs is started (and
    stopped by ``close``); with it, the executor joins that cluster ("auto", "ray://host:10001", ...).
    """

    def __init__(self, address: str | None = None, num_workers: int = 2, cpus_per_worker: int = 1):
        self.address = address
        self.num_workers = _positive(num_workers, "workers")
        self.threads_per_task = _positive(cpus_per_worker, "cpus per worker")
        self._started = False

    def map(self, fn, items, initializer=None, initargs=()):
        items = list(items)
        if not items:
            return
        ray = self._connect()
        from ray.util import ActorPool

        worker = ray.remote(num_cpus=self.threads_per_task)(_RayWorker)
        actors = [worker.remote(initializer, tuple(initargs)) for _ in range(min(self.num_workers, len(items)))]
        fn_ref = ray.put(fn)  # shipped once, not with every item
        try:
            yield from ActorPool(actors).map(lambda actor, item: actor.run.remote(fn_ref, item), items)
        finally:
            for actor in actors:
                ray.kill(actor)

    def _connect(self):
        try:
            import ray
        except ImportError:
            raise CpOnnxError(f"the ray executor needs Ray: {RAY_HINT}, or use --executor inprocess") from None
        if not ray.is_initialized():
            local = {"num_cpus": self.num_workers * self.threads_per_task} if self.address is None else {}
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, **local)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise CpOnnxError(f"cannot reach the Ray cluster at {self.address} ({exc}); start it with `ray start --head` or fix --address") from None
            self._started = True
        return ray

    def close(self) -> None:
        """Stop the Ray runtime if this executor started it."""
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _RayWorker:
    """A Ray actor: runs the initializer once, then one item per call (made remote when Ray is imported)."""

    def __init__(self, initializer: Callable | None, initargs: tuple):
        if initializer is not None:
            initializer(*initargs)

    def run(self, fn: Callable, item: Any) -> Any:
        return fn(item)


def make_executor(name: str = "inprocess", *, address: str | None = None, workers: int | None = None) -> Executor:
    """``inprocess`` (``workers`` > 1: that many local processes) or ``ray`` (``workers`` actors, default 2)."""
    if name == "ray":
        return RayExecutor(address, num_workers=workers or 2)
    if name != "inprocess":
        raise CpOnnxError(f"unknown executor {name!r}; use one of {', '.join(EXECUTORS)}")
    if address is not None:
        raise CpOnnxError("--address applies to --executor ray only; add --executor ray or drop --address")
    return ProcessExecutor(workers) if workers and workers > 1 else InProcessExecutor()


def add_executor_arguments(parser) -> None:
    """``--executor`` and ``--address`` for a CLI command (its ``--workers``, if any, sets the worker count)."""
    parser.add_argument("--executor", choices=EXECUTORS, default="inprocess", help="where to run: this machine (default) or a Ray cluster")
    parser.add_argument("--address", help="Ray cluster address (e.g. auto or ray://head:10001); default: a local Ray runtime")


def executor_from_args(args) -> Executor:
    return make_executor(args.executor, address=args.address, workers=getattr(args, "workers", None))


def close(executor: Executor) -> None:
    """Release what an executor started (a local Ray runtime); a no-op for the others."""
    if hasattr(executor, "close"):
        executor.close()


def _positive(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CpOnnxError(f"{what} must be a whole number >= 1, not {value!r}")
    return value
