"""The one serializer: cloudpickle, name by name, so a failure names the variable."""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import pickle
import sys
import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import cloudpickle

from .errors import DashError

__all__ = [
    "SerializationError",
    "dumps",
    "dumps_names",
    "dumps_oob",
    "loads",
    "loads_names",
    "loads_oob",
]


class SerializationError(DashError, TypeError):
    """Some named values could not be pickled (or unpickled); nothing was sent."""

    def __init__(self, action: str, failures: Mapping[str, str]):
        self.failures = dict(failures)
        listed = "; ".join(f"{name} ({why})" for name, why in self.failures.items())
        noun = "variable" if len(self.failures) == 1 else "variables"
        super().__init__(f"cannot {action} {noun} {listed}")


# DASH's own packages are on every worker, however DASH was installed (an editable install
# lists only a .pth file, so no distribution seems to provide them).
_DASH_PACKAGES = frozenset({"dash_kernel", "dash_gateway", "dash_worker", "dash_nbext"})


@functools.cache
def _installed_top_level() -> frozenset[str]:
    return frozenset(importlib.metadata.packages_distributions()) | _DASH_PACKAGES


_lock = threading.RLock()
_local_modules: tuple[int, list[Any]] = (0, [])


def _user_modules() -> list[Any]:
    """Modules that no installed distribution provides: the user's own code."""
    global _local_modules
    if _local_modules[0] != len(sys.modules):
        installed = _installed_top_level()
        found = [
            module
            for name, module in list(sys.modules.items())
            if "." not in name
            and name != "__main__"
            and name not in installed
            and name not in sys.stdlib_module_names
            and getattr(module, "__file__", None)
        ]
        _local_modules = (len(sys.modules), found)
    return _local_modules[1]


@contextlib.contextmanager
def _user_code_by_value() -> Iterator[None]:
    """While DASH pickles, send the user's own modules' functions and classes by value.

    A function from a ``helpers.py`` beside the notebook would otherwise be pickled by
    reference, and a worker, which has no such file, could not import it. The
    registration is undone afterwards so other users of cloudpickle are not affected.
    """
    with _lock:
        registered = []
        for module in _user_modules():
            if module.__name__ not in cloudpickle.list_registry_pickle_by_value():
                cloudpickle.register_pickle_by_value(module)
                registered.append(module)
        try:
            yield
        finally:
            for module in registered:
                cloudpickle.unregister_pickle_by_value(module)


def dumps(obj: Any) -> bytes:
    """Pickle one object with cloudpickle: functions and classes from notebooks and from
    the user's own modules travel by value."""
    with _user_code_by_value():
        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """Unpickle what :func:`dumps` produced."""
    return pickle.loads(data)


def dumps_oob(obj: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``obj`` (protocol 5) with its large buffers out of band.

    Returns the pickle and the buffers as flat byte views of the object's own memory (a
    numpy array's data, for instance), so that storing them copies nothing; they are valid
    while ``obj`` is alive and unchanged. Buffers that are not contiguous stay in the pickle.
    """
    buffers: list[memoryview] = []

    def take(buffer: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(buffer.raw())
        except BufferError:
            return True  # not contiguous: pickled in band
        return False

    with _user_code_by_value():
        data = cloudpickle.dumps(obj, protocol=5, buffer_callback=take)
    return data, buffers


def loads_oob(data: bytes | memoryview, buffers: Iterable[Any]) -> Any:
    """Unpickle what :func:`dumps_oob` produced; ``buffers`` (bytes-like, in order) back
    the objects directly: a writable buffer such as a ``bytearray`` gives a writable array."""
    return pickle.loads(data, buffers=list(buffers))


def describe_failure(value: Any, exc: BaseException) -> str:
    """Why ``value`` could not be pickled: its type and the error."""
    return f"{type(value).__module__}.{type(value).__qualname__}: {exc}".removeprefix("builtins.")


def dumps_names(
    namespace: Mapping[str, Any], names: Iterable[str], *, strict: bool = True
) -> tuple[dict[str, bytes], dict[str, str]]:
    """Pickle ``namespace[name]`` for each name, each separately.

    Returns ``(payload, failures)``, where ``failures`` maps a name to its type and the
    reason. With ``strict`` (for inputs), any failure raises :class:`SerializationError`
    naming every unpicklable variable, so that nothing half-sent runs.
    """
    payload: dict[str, bytes] = {}
    failures: dict[str, str] = {}
    for name in names:
        if name not in namespace:
            continue
        value = namespace[name]
        try:
            payload[name] = dumps(value)
        except Exception as exc:
            failures[name] = describe_failure(value, exc)
    if strict and failures:
        raise SerializationError("send", failures)
    return payload, failures


def loads_names(payload: Mapping[str, bytes]) -> tuple[dict[str, Any], dict[str, str]]:
    """Unpickle each entry separately; returns ``(values, failures)``."""
    values: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for name, data in payload.items():
        try:
            values[name] = loads(data)
        except Exception as exc:
            failures[name] = f"{type(exc).__name__}: {exc}"
    return values, failures
