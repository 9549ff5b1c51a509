"""``dk.remote`` and ``dk.map``: run functions on workers, with resources, output and progress."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import distributed
from dask.sizeof import sizeof
from distributed import Future
from distributed.worker import thread_state

from .cluster import QUEUE_NOTICE_AFTER, Connection, connect
from .output import Destination
from .resources import ResourceSpec
from .tasks import RemoteCall
from .tracebacks import attach_renderer, clean_traceback

__all__ = ["RemoteFunction", "map", "remote", "remote_exception", "submit_tasks", "wait_for"]

SCATTER_OVER = 1 << 20  # bytes


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
    """Values over ``SCATTER_OVER`` bytes sent straight to a worker, replaced by futures.

    In a task's arguments they would travel through the scheduler inside the task graph,
    and stay in its memory. With ``each_value``, the values of a dict are looked at.
    """
    if each_value:
        return [dict(zip(d, _scattered(conn, list(d.values())), strict=True)) for d in values]
    large = [i for i, value in enumerate(values) if sizeof(value) > SCATTER_OVER]
    if not large:
        return values
    futures = conn.client.scatter([values[i] for i in large], hash=False)
    out = list(values)
    for i, future in zip(large, futures, strict=True):
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
    busy, say so on stderr."""
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
        conn.client.cancel(futures)
        raise
    finally:
        conn.router.forget(f.key for f in futures if f.done())


def _say_if_queued(conn: Connection, futures: list[Future], spec: ResourceSpec) -> None:
    first_done = threading.Event()
    for future in futures[:100]:  # enough to see that work is moving
        future.add_done_callback(lambda _: first_done.set())
    if not first_done.wait(QUEUE_NOTICE_AFTER):
        reason = conn.waiting_reason(spec, [f.key for f in futures if not f.done()])
        if reason:
            print(f"DASH: {reason}", file=sys.stderr, flush=True)


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
    from tqdm.auto import tqdm

    with tqdm(
        total=len(items),
        disable=not progress,
        desc=getattr(function, "__name__", "map"),
        delay=0.5,
        unit="item",
    ) as bar:
        wait_for(conn, futures, on_done=bar.update, fail_fast=not return_exceptions, spec=spec)
    results: list[Any] = [None] * len(futures)
    good = [i for i, f in enumerate(futures) if f.status == "finished"]
    for i, value in zip(good, conn.client.gather([futures[i] for i in good]), strict=False):
        results[i] = value
    for i, future in enumerate(futures):
        if future.status != "finished":
            results[i] = remote_exception(future)
    return results
