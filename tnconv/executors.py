"""Running independent tasks on an executor: the plumbing :func:`tnconv.study` and
:func:`tnconv.select_ranks` share.

``executor`` is ``"processes"`` (a local spawn process pool of ``workers`` processes, made and
closed here), a Dask scheduler address ``"tcp://host:port"`` (a ``distributed.Client`` made and
closed here), a ``distributed.Client``, or any ``concurrent.futures.Executor`` (anything with
``submit`` returning futures). What every task shares (the model, the callables) travels once:
through the pool's initializer, scattered once to a Dask cluster, or with each task to another
executor; each task itself is small.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import NotPicklableError

__all__ = [
    "ModelPayload",
    "TaskRunner",
    "check_picklable",
    "default_worker_threads",
    "is_dask_client",
    "model_payload",
]


@dataclass(frozen=True)
class ModelPayload:
    """The dense model as workers receive it: ``factory`` + ``state`` (tensors), or the pickled
    module. ``token`` identifies it so a worker builds it once for all its tasks."""

    token: str
    factory: Callable[[], nn.Module] | None = None
    state: dict[str, torch.Tensor] | None = None
    pickled: bytes | None = None

    def build(self) -> nn.Module:
        """The model, in eval mode."""
        if self.pickled is not None:
            model = pickle.loads(self.pickled)
        else:
            assert self.factory is not None and self.state is not None
            model = self.factory()
            model.load_state_dict(self.state)
        return model.eval()

    @property
    def nbytes(self) -> int:
        if self.pickled is not None:
            return len(self.pickled)
        assert self.state is not None
        return sum(t.numel() * t.element_size() for t in self.state.values())


def check_picklable(what: str, obj: Any) -> None:
    """Raise :class:`NotPicklableError` naming ``what`` if ``obj`` (not None) cannot be pickled:
    it could not reach a worker process."""
    if obj is None:
        return
    try:
        pickle.dumps(obj)
    except Exception as exc:
        raise NotPicklableError(
            f"{what}={obj!r} cannot be sent to worker processes ({type(exc).__name__}: {exc}); "
            "pass a module-level function (or a functools.partial of one), not a lambda, "
            "a local function or a closure"
        ) from exc


def model_payload(model: nn.Module, factory: Callable[[], nn.Module] | None) -> ModelPayload:
    """``model`` as a :class:`ModelPayload`: pickled, or (with ``factory``) the factory and a CPU
    copy of the state dict. :class:`NotPicklableError` names what cannot be pickled."""
    token = uuid.uuid4().hex
    if factory is not None:
        check_picklable("model_factory", factory)
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return ModelPayload(token, factory=factory, state=state)
    try:
        pickled = pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        raise NotPicklableError(
            f"the model ({type(model).__name__}) cannot be pickled for worker processes "
            f"({type(exc).__name__}: {exc}); pass model_factory= (a picklable function "
            "building the architecture) and its state_dict is sent instead"
        ) from exc
    return ModelPayload(token, pickled=pickled)


def is_dask_client(executor: Any) -> bool:
    return type(executor).__module__.split(".")[0] == "distributed" and hasattr(executor, "scatter")


def default_worker_threads(executor: Any, threads: int | None) -> int | None:
    """Torch threads per worker: ``threads`` if given; else 1 for the process pool, Dask clients
    and scheduler addresses (one task per core), None (untouched) for other executors."""
    if threads is not None:
        return threads
    if isinstance(executor, str) or is_dask_client(executor):
        return 1
    return None


class TaskRunner:
    """An executor opened for one run of tasks ``fn(task, *shared)``.

    Use as a context manager: an executor made here (``"processes"``, an address) is closed on
    exit, a given one is left open. ``shared`` travels once per worker where it can (pool
    initializer ``initializer(*initargs)``, Dask scatter); a pool made here calls ``fn(task)``,
    so its ``fn`` must find ``shared`` where ``initializer`` left it. :meth:`run` may be called
    several times (e.g. the rounds of a greedy search) on the same workers.

    Args:
        executor: see the module docstring.
        fn: a picklable module-level function.
        shared: the arguments every task shares (picklable).
        workers: processes for ``"processes"`` (default: the CPU count, at most ``max_tasks``).
        max_tasks: the most tasks one :meth:`run` submits (sizes the pool).
        initializer, initargs: the pool's initializer.
        error: the exception type for an unusable ``executor`` / ``workers``.
        key: a Dask task key prefix.
    """

    def __init__(
        self,
        executor: Any,
        fn: Callable[..., Any],
        shared: Sequence[Any],
        *,
        workers: int | None = None,
        max_tasks: int = 1,
        initializer: Callable[..., None] | None = None,
        initargs: Sequence[Any] = (),
        error: type[Exception] = ValueError,
        key: str = "tnconv",
    ) -> None:
        self.fn, self.shared, self.key = fn, tuple(shared), key
        self.owned: Any = None
        self._scattered: list[Any] | None = None
        if workers is not None and executor != "processes":
            raise error(
                f"workers={workers} sizes executor='processes'; a distributed.Client or an "
                "Executor brings its own workers"
            )
        if isinstance(executor, str):
            if executor == "processes":
                if workers is not None and workers < 1:
                    raise error(f"workers must be >= 1, got {workers}")
                self.owned = executor = ProcessPoolExecutor(
                    max_workers=max(1, min(workers or os.cpu_count() or 1, max_tasks)),
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=initializer,
                    initargs=tuple(initargs),
                )
            elif "://" in executor:
                try:
                    from distributed import Client
                except ImportError as exc:
                    raise ImportError(
                        "a Dask scheduler address needs distributed: "
                        "pip install 'tnconv[distributed]'"
                    ) from exc
                self.owned = executor = Client(executor)
            else:
                raise error(
                    f"executor={executor!r}: expected None, 'processes', a scheduler address "
                    "'tcp://host:port', a concurrent.futures.Executor or a distributed.Client"
                )
        if not is_dask_client(executor) and not hasattr(executor, "submit"):
            self.close()
            raise error(
                f"executor={executor!r} has no submit(); expected a concurrent.futures.Executor "
                "or a distributed.Client"
            )
        self.executor = executor

    def __enter__(self) -> TaskRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel what was scattered; close an executor made here."""
        if self._scattered is not None:
            self.executor.cancel(self._scattered)
            self._scattered = None
        owned, self.owned = self.owned, None
        if owned is not None:
            if isinstance(owned, ProcessPoolExecutor):
                owned.shutdown(wait=True, cancel_futures=True)
            else:
                owned.close()

    def run(
        self,
        tasks: Sequence[Any],
        finish: Callable[[Any, Any], None],
        lost: Callable[[Any, BaseException], Any] | None = None,
        key: Callable[[Any], str] | None = None,
    ) -> None:
        """Submit every task; call ``finish(task, result)`` as each result arrives (any order).
        A task whose future raises (the task's own exception, a dead worker) gives
        ``finish(task, lost(task, exc))``, or re-raises when ``lost`` is None (the other tasks
        are cancelled). ``key(task)`` names a Dask task (unique per run)."""
        if is_dask_client(self.executor):
            self._run_dask(tasks, finish, lost, key)
            return
        if self.owned is not None and isinstance(self.owned, ProcessPoolExecutor):
            futures = {self.executor.submit(self.fn, t): t for t in tasks}  # initializer: shared
        else:
            futures = {self.executor.submit(self.fn, t, *self.shared): t for t in tasks}
        try:
            for fut in as_completed(futures):
                task = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:
                    if lost is None:
                        raise
                    result = lost(task, exc)
                finish(task, result)
        finally:
            for fut in futures:
                fut.cancel()

    def _run_dask(
        self,
        tasks: Sequence[Any],
        finish: Callable[[Any, Any], None],
        lost: Callable[[Any, BaseException], Any] | None,
        key: Callable[[Any], str] | None,
    ) -> None:
        """``shared`` scattered once (workers fetch it from each other, not from here); each
        task ships as a few hundred bytes."""
        from distributed import as_completed as dask_as_completed

        client = self.executor
        if self._scattered is None:
            self._scattered = list(client.scatter(list(self.shared), hash=False))
        futures = {
            client.submit(
                self.fn,
                t,
                *self._scattered,
                pure=False,
                key=key(t) if key is not None else f"{self.key}-{uuid.uuid4().hex}",
            ): t
            for t in tasks
        }
        try:
            for fut in dask_as_completed(list(futures)):
                task = futures[fut]
                try:
                    result = fut.result()
                except Exception as exc:
                    if lost is None:
                        raise
                    result = lost(task, exc)
                finish(task, result)
        finally:
            client.cancel(list(futures))
