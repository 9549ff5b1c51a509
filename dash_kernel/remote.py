"""``dk.remote`` and ``dk.map``: run functions on workers, with resources, output and progress."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import distributed
from dask.base import is_dask_collection
from dask.sizeof import sizeof
from distributed import Future
from distributed.worker import thread_state

from .cluster import QUEUE_NOTICE_AFTER, Connection, _task_states, connect
from .output import Destination
from .resources import ResourceSpec
from .tasks import RemoteCall
from .tracebacks import attach_renderer, clean_traceback

__all__ = ["RemoteFunction", "map", "remote", "remote_exception", "submit_tasks", "wait_for"]

SCATTER_OVER = 1 << 20  # bytes
# A cancelled task's thread has this many seconds to stop before its worker is restarted.
STOP_GRACE = 2.0
RESTART_TIMEOUT = 30.0
# Worker task states in which a thread still runs the task (cancelled: not yet noticed).
_RUNNING_STATES = frozenset({"executing", "long-running", "cancelled", "resumed"})


def submit_tasks(
    conn: Connection,
    function: Callable[..., Any],
    argument_lists: Sequence[Iterable[Any]],
    *,
    spec: ResourceSpec,
    name: str,
    kwargs: dict[str, Any] | None = None,
    priority: int = 0,
    retries: int = 0,
    display: bool = False,
) -> list[Future]:
    """Submit ``function`` once per element of the ``argument_lists`` (zipped, as
    ``Client.map`` takes them; none means one call without arguments), placed by
    ``spec``, its output routed to the caller."""
    conn.ensure_satisfiable(spec)
    arguments = [list(a) for a in argument_lists]
    count = len(arguments[0]) if arguments else 1
    prefix = f"{name}-{uuid.uuid4().hex[:12]}"
    keys = [f"{prefix}-{i}" for i in range(count)]
    conn.router.register(keys, Destination.capture())
    call = RemoteCall(function, conn.topic, display=display, storage=conn.storage_access())
    options = {
        "resources": spec.to_dask() or None,
        "priority": priority,
        "retries": retries or None,  # 0 would still add a per-task annotation
        "pure": False,
    }
    arguments = [_scattered(conn, values) for values in arguments]
    if count == 1:
        args = [values[0] for values in arguments]
        if kwargs:
            [keywords] = _scattered(conn, [dict(kwargs)], each_value=True)
            return [conn.client.submit(call.with_keywords, keywords, *args, key=keys[0], **options)]
        return [conn.client.submit(call, *args, key=keys[0], **options)]
    return conn.client.map(call, *arguments, key=keys, **options)


def _scattered(conn: Connection, values: list[Any], *, each_value: bool = False) -> list[Any]:
    """Arguments made ready for a task, as futures that Dask resolves before it runs:
    Dask collections (a ``Delayed``, a dask array) computed on the cluster, as
    ``Client.compute`` would, and values over ``SCATTER_OVER`` bytes sent straight to a
    worker (in a task's arguments they would travel through the scheduler inside the task
    graph, and stay in its memory). With ``each_value``, the values of a dict are looked at.
    """
    if each_value:
        return [dict(zip(d, _scattered(conn, list(d.values())), strict=True)) for d in values]
    out = list(values)
    lazy = [i for i, value in enumerate(values) if is_dask_collection(value)]
    if lazy:
        for i, future in zip(lazy, conn.client.compute([values[i] for i in lazy]), strict=True):
            out[i] = future
    large = [i for i, value in enumerate(values) if i not in lazy and sizeof(value) > SCATTER_OVER]
    if large:
        for i, future in zip(
            large, conn.client.scatter([values[i] for i in large], hash=False), strict=True
        ):
            out[i] = future
    return out


def remote_exception(future: Future) -> BaseException:
    """An errored future's exception, its traceback holding only the user's remote frames."""
    exc = future.exception()
    return attach_renderer(clean_traceback(exc.with_traceback(future.traceback())))


@contextlib.contextmanager
def _worker_thread_released() -> Iterator[None]:
    """Inside a task, give the worker its thread back while waiting for other tasks;
    otherwise tasks that fan out (``dk.map`` in a remote function) can take every
    thread and wait forever for work that has none left to run on."""
    if getattr(thread_state, "key", None) is None:
        yield
        return
    distributed.secede()
    try:
        yield
    finally:
        distributed.rejoin()


def wait_for(
    conn: Connection,
    futures: list[Future],
    *,
    on_done: Callable[[int], None] | None = None,
    fail_fast: bool = True,
    spec: ResourceSpec | None = None,
) -> None:
    """Wait until every future is finished. Ctrl-C cancels them all (the remote work
    stops); with ``fail_fast`` the first remote error cancels the rest and is raised.
    If nothing finishes for a few seconds because every worker that fits ``spec`` is
    busy, say so (on stdout: it is news, not an error)."""
    try:
        with _worker_thread_released():
            if spec is not None:
                _say_if_queued(conn, futures, spec)
            # batches(): everything finished since the last look, with one wake-up
            completed = distributed.as_completed(futures, loop=conn.client.loop)
            for batch in completed.batches():
                if fail_fast:
                    failed = next((f for f in batch if f.status == "error"), None)
                    if failed is not None:
                        conn.client.cancel([f for f in futures if not f.done()])
                        raise remote_exception(failed)
                if on_done is not None:
                    on_done(len(batch))
    except KeyboardInterrupt:
        raise stop_remote_work(conn, futures) from None
    finally:
        conn.router.forget(f.key for f in futures if f.done())


def stop_remote_work(conn: Connection, futures: list[Future]) -> KeyboardInterrupt:
    """Cancel ``futures`` and make sure their code stops: a thread stuck in C code (a
    long ``time.sleep``) cannot take the exception that stops a cancelled task, so its
    worker process is restarted. Returns the one-line interrupt to show the user."""
    keys = [f.key for f in futures if not f.done()]
    running = _workers_running(conn, keys)
    conn.client.cancel(futures)
    deadline = time.monotonic() + STOP_GRACE
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = _workers_running(conn, keys)
    message = "the remote work was stopped"
    if running:
        names = _worker_names(conn, running)
        conn.client.restart_workers(sorted(running), timeout=RESTART_TIMEOUT, raise_for_error=False)
        noun = "worker" if len(names) == 1 else "workers"
        message += f" ({noun} {', '.join(names)} restarted)"
    return user_interrupt(message)


def user_interrupt(message: str) -> KeyboardInterrupt:
    """A ``KeyboardInterrupt`` that IPython shows as one line, with no local frames."""
    interrupt = KeyboardInterrupt(message)
    line = f"\x1b[0;31mKeyboardInterrupt\x1b[0m: {message}"
    interrupt._render_traceback_ = lambda: [line]  # type: ignore[attr-defined]
    return interrupt


def _workers_running(conn: Connection, keys: list[str]) -> set[str]:
    """Addresses of the workers with a thread still running one of ``keys``."""
    if not keys:
        return set()
    try:
        states = conn.client.run(_task_states, keys, on_error="return")
    except Exception:
        return set()
    return {
        address
        for address, by_key in states.items()
        if isinstance(by_key, dict) and _RUNNING_STATES.intersection(by_key.values())
    }


def _worker_names(conn: Connection, addresses: set[str]) -> list[str]:
    try:
        info = conn.client.scheduler_info(n_workers=-1)["workers"]
    except Exception:
        info = {}
    return sorted(str(info.get(a, {}).get("name", a)) for a in addresses)


def _say_if_queued(conn: Connection, futures: list[Future], spec: ResourceSpec) -> None:
    first_done = threading.Event()
    for future in futures[:100]:  # enough to see that work is moving
        future.add_done_callback(lambda _: first_done.set())
    if not first_done.wait(QUEUE_NOTICE_AFTER):
        reason = conn.waiting_reason(spec, [f.key for f in futures if not f.done()])
        if reason:
            print(f"DASH: {reason}", flush=True)


def _progress_bar(**options: Any) -> Any:
    """A ``tqdm.auto`` bar: a widget in a notebook that can show one, else text.

    Without ipywidgets tqdm warns that it falls back to text; a plain kernel is an
    ordinary place to be, so it falls back silently. A text bar in a Jupyter kernel goes
    to stdout, which front ends do not colour as an error.
    """
    from tqdm.std import TqdmWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TqdmWarning)
        from tqdm.auto import tqdm
        from tqdm.autonotebook import tqdm as chosen  # the widget bar, or the text one
    if "ipykernel.zmqshell" in sys.modules and chosen.__module__ == "tqdm.std":
        options.setdefault("file", sys.stdout)
    return tqdm(**options)


def _spec_kwargs(gpu, cpu, memory, vram) -> ResourceSpec:
    return ResourceSpec.parse(gpu=gpu, cpu=cpu, memory=memory, vram=vram)


class RemoteFunction:
    """A function that runs on a worker when called. Made by :func:`remote`.

    >>> @dk.remote(gpu=1)
    ... def train(epochs):
    ...     return model.fit(epochs)
    >>> train(3)                 # runs on a GPU worker, returns the result
    >>> future = train.submit(3) # returns a dask Future at once
    """

    def __init__(
        self, fn: Callable[..., Any], spec: ResourceSpec, priority: int = 0, retries: int = 0
    ):
        self.fn = fn
        self.spec = spec
        self.priority = priority
        self.retries = retries
        functools.update_wrapper(self, fn)

    def submit(self, *args: Any, **kwargs: Any) -> Future:
        """Run on a worker and return a :class:`distributed.Future` at once."""
        conn = connect()
        return submit_tasks(
            conn,
            self.fn,
            [[arg] for arg in args],
            kwargs=kwargs,
            spec=self.spec,
            name=getattr(self.fn, "__name__", "remote"),
            priority=self.priority,
            retries=self.retries,
        )[0]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        conn = connect()
        future = self.submit(*args, **kwargs)
        wait_for(conn, [future], spec=self.spec)
        return future.result()

    def map(self, iterable: Iterable[Any], **options: Any) -> list[Any]:
        """``dk.map(self, iterable, **options)`` with this function's resources."""
        return map(self, iterable, **options)

    def __repr__(self) -> str:
        return f"<dash remote function {getattr(self.fn, '__qualname__', self.fn)!r} ({self.spec})>"


def remote(
    fn: Callable[..., Any] | None = None,
    *,
    gpu: int | str | None = None,
    cpu: float | None = None,
    memory: int | str | None = None,
    vram: int | str | None = None,
    priority: int = 0,
    retries: int = 0,
) -> Any:
    """Make ``fn`` run on a DASH worker that has the given resources.

    Use bare (``@dk.remote``) or with a spec (``@dk.remote(gpu="A100", memory="32GB")``).
    ``priority``: higher runs first when work queues; ``retries``: how often to rerun the
    function if its worker dies or it raises. A spec that no worker can ever satisfy
    raises :class:`~dash_kernel.resources.ResourceUnavailable` when called.
    """
    spec = _spec_kwargs(gpu, cpu, memory, vram)

    def wrap(function: Callable[..., Any]) -> RemoteFunction:
        return RemoteFunction(function, spec, priority=priority, retries=retries)

    return wrap(fn) if fn is not None else wrap


def map(
    fn: Callable[..., Any],
    iterable: Iterable[Any],
    *,
    return_exceptions: bool = False,
    progress: bool = True,
    gpu: int | str | None = None,
    cpu: float | None = None,
    memory: int | str | None = None,
    vram: int | str | None = None,
    priority: int | None = None,
    retries: int | None = None,
) -> list[Any]:
    """Run ``fn(item)`` on workers for every item; results come back in input order.

    A progress bar (``tqdm.auto``) shows in notebooks and terminals. The first failure
    cancels the rest and is raised with its remote traceback; with
    ``return_exceptions=True`` failures are returned in place of their results instead.
    Ctrl-C cancels everything still running.

    >>> dk.map(render_frame, range(1200), cpu=1)   # doctest: +SKIP
    """
    base = fn.spec if isinstance(fn, RemoteFunction) else ResourceSpec()
    given = _spec_kwargs(gpu, cpu, memory, vram)
    spec = given if given else base
    function = fn.fn if isinstance(fn, RemoteFunction) else fn
    if priority is None:
        priority = fn.priority if isinstance(fn, RemoteFunction) else 0
    if retries is None:
        retries = fn.retries if isinstance(fn, RemoteFunction) else 0
    items = list(iterable)
    if not items:
        return []
    conn = connect()
    futures = submit_tasks(
        conn,
        function,
        [items],
        spec=spec,
        name=getattr(function, "__name__", "map"),
        priority=priority,
        retries=retries,
    )
    with _progress_bar(
        total=len(items),
        disable=not progress,
        desc=getattr(function, "__name__", "map"),
        delay=0.5,
        unit="item",
    ) as bar:
        wait_for(conn, futures, on_done=bar.update, fail_fast=not return_exceptions, spec=spec)
    results: list[Any] = [None] * len(futures)
    # Not only the finished ones: a result lost with a dead worker is being recomputed.
    good = [i for i, f in enumerate(futures) if f.status != "error"]
    for i, value in zip(good, conn.client.gather([futures[i] for i in good]), strict=True):
        results[i] = value
    for i, future in enumerate(futures):
        if future.status == "error":
            results[i] = remote_exception(future)
    return results
