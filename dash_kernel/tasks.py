"""What runs on a worker for ``dk.remote``, ``dk.map`` and ``%%dash``: Dask task bodies."""

from __future__ import annotations

import ast
import builtins
import contextlib
import copyreg
import ctypes
import io
import linecache
import os
import pickle
import threading
import types
from collections import ChainMap
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle
from distributed import get_worker

from .capture import format_display, open_figures, publish_new_figures, task_output
from .serialize import (
    SerializationError,
    _user_code_by_value,
    dumps_names,
    loads,
    loads_names,
)

__all__ = [
    "RUNNING_FILE_ENV",
    "RemoteCall",
    "RemoteCancelled",
    "Tracked",
    "cancel_running",
    "dumps_function",
    "run_cell",
]

# key -> thread ident of the task running it, so a cancelled task can be stopped.
_running: dict[str, int] = {}
_running_lock = threading.Lock()
# Set by the DASH nanny plugin: the file where this worker process keeps the keys of the
# DASH tasks it runs, so that its nanny can tell which task a dead worker was running.
RUNNING_FILE_ENV = "DASH_RUNNING_FILE"


class RemoteCancelled(Exception):
    """Raised inside a running task whose caller cancelled it (for example Ctrl-C)."""


class Tracked:
    """Registers the current thread as running the current task, for cancellation."""

    def __enter__(self) -> None:
        self.key = str(get_worker().get_current_task())
        with _running_lock:
            _running[self.key] = threading.get_ident()
            _write_running()

    def __exit__(self, *exc_info: object) -> None:
        with _running_lock:
            _running.pop(self.key, None)
            _write_running()


def _write_running() -> None:
    """Written before the task's code runs: a segfault leaves no time for anything else."""
    path = os.environ.get(RUNNING_FILE_ENV)
    if not path:
        return
    try:
        with open(path, "w") as file:
            file.write("\n".join(_running))
    except OSError:
        pass  # then a death of this worker is blamed as Dask would blame it


def cancel_running(key: str) -> bool:
    """Raise :class:`RemoteCancelled` in the thread running ``key``, if any.

    Python delivers it at the next bytecode boundary: a loop stops at once, a blocking C
    call (a long ``time.sleep``) when it returns.
    """
    with _running_lock:
        ident = _running.get(str(key))
    if ident is None:
        return False
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(RemoteCancelled)
    )
    return True


class RemoteCall:
    """A user's function wrapped so its output streams to ``topic`` while it runs."""

    def __init__(
        self,
        fn: Callable[..., Any],
        topic: str,
        *,
        display: bool = False,
        storage: tuple[str, str] | None = None,
    ):
        self.fn = fn
        self.topic = topic
        self.display = display
        # (gateway URL, storage token): dk.save and dk.load in the task use the caller's storage.
        self.storage = storage
        self.__name__ = getattr(fn, "__name__", "remote")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with Tracked(), task_output(self.topic, display=self.display), _storage(self.storage):
            return self.fn(*args, **kwargs)

    def with_keywords(self, kwargs: dict[str, Any], *args: Any) -> Any:
        """Call with keyword arguments that travelled as one positional dict, so Dask
        resolves futures in them and none is taken for one of ``Client.submit``'s own."""
        return self(*args, **kwargs)

    def __reduce__(self) -> tuple[Any, ...]:
        # Dask pickles with plain pickle first, which would send a function from the
        # user's own module by reference; ours honours ship_local_modules().
        return (_restore_call, (dumps_function(self.fn), self.topic, self.display, self.storage))


def _code_with_filename(arguments: tuple[Any, ...], filename: str) -> types.CodeType:
    return types.CodeType(*arguments).replace(co_filename=filename)


def _code_reduce(code: types.CodeType) -> tuple[Any, ...]:
    # cloudpickle sends code as "<dynamic-code>"; the real file name lets the caller's
    # linecache (IPython's cells, the user's files) show the lines of a remote traceback.
    _, arguments = cloudpickle.cloudpickle._code_reduce(code)
    return _code_with_filename, (arguments, code.co_filename)


class _Pickler(cloudpickle.Pickler):
    """cloudpickle, with code objects keeping the name of the file they came from."""

    _dispatch_table = {**cloudpickle.Pickler._dispatch_table, types.CodeType: _code_reduce}
    dispatch_table = ChainMap(_dispatch_table, copyreg.dispatch_table)


def dumps_function(fn: Callable[..., Any]) -> bytes:
    """Pickle a task's function as :func:`~dash_kernel.serialize.dumps` does, with its
    code's file names kept, so that remote tracebacks show the user's own lines."""
    buffer = io.BytesIO()
    with _user_code_by_value():
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(fn)
    return buffer.getvalue()


def _restore_call(
    fn: bytes, topic: str, display: bool, storage: tuple[str, str] | None = None
) -> RemoteCall:
    return RemoteCall(loads(fn), topic, display=display, storage=storage)


def _storage(access: tuple[str, str] | None) -> contextlib.AbstractContextManager[None]:
    if access is None:
        return contextlib.nullcontext()
    from .storage.api import use_storage  # only tasks that carry storage access need it

    return use_storage(*access)


def _split_last_expression(tree: ast.Module) -> tuple[ast.Module, ast.Expression | None]:
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = tree.body.pop()
        return tree, ast.Expression(last.value)
    return tree, None


def run_cell(
    source: str,
    filename: str,
    inputs: Mapping[str, bytes],
    outputs: tuple[str, ...],
) -> dict[str, Any]:
    """Run a ``%%dash`` cell in a fresh namespace holding ``inputs`` (as the body of a
    :class:`RemoteCall` with ``display=True``).

    Returns ``{"outputs": {name: pickle}, "unpicklable": {name: why}, "result": bundle}``;
    the result is the last expression's display bundle, formatted here so that the value
    itself need not travel.
    """
    values, failures = loads_names(inputs)
    if failures:
        raise SerializationError("load on the worker", failures)
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": builtins, **values}
    # Registered so tracebacks formatted here show the cell's lines too.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    body, last = _split_last_expression(ast.parse(source, filename))
    result = None
    figures = open_figures()
    try:
        exec(compile(body, filename, "exec"), namespace)
        if last is not None:
            value = eval(compile(last, filename, "eval"), namespace)
            if value is not None:
                result = format_display(value)
    finally:
        publish_new_figures(figures)
    payload, unpicklable = dumps_names(
        namespace, [n for n in outputs if n in namespace], strict=False
    )
    return {"outputs": payload, "unpicklable": unpicklable, "result": result}
