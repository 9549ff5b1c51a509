"""The gateway's scheduler queries refuse pickles, whatever the scheduler sends back."""

from __future__ import annotations

import asyncio

import pytest
from distributed.core import Server
from distributed.protocol.serialize import ToPickle

from dash_gateway.scheduler_rpc import scheduler_identity, workers_from_identity

UNPICKLED: list[str] = []


def _record(what: str) -> None:
    UNPICKLED.append(what)


class Payload:
    """Records it was unpickled: what an attacker's object would run instead."""

    def __reduce__(self):
        return (_record, ("unpickled",))


async def _serve(reply: dict) -> Server:
    server = Server({"identity": lambda n_workers=-1: reply})
    await server.listen("tcp://127.0.0.1:0")
    return server


def test_plain_identity_is_read() -> None:
    async def main() -> dict:
        reply = {"workers": {"tcp://w:1": {"name": "w", "nthreads": 2, "resources": {"CPU": 2}}}}
        server = await _serve(reply)
        try:
            return await scheduler_identity(server.address, {})
        finally:
            await server.close()

    info = asyncio.run(main())
    assert workers_from_identity(info) == [
        {
            "name": "w",
            "address": "tcp://w:1",
            "resources": {"CPU": 2},
            "nthreads": 2,
            "memory_limit": None,
            "status": None,
        }
    ]


def test_a_pickle_in_the_reply_is_refused() -> None:
    async def main() -> None:
        server = await _serve({"workers": {"tcp://w:1": {"name": ToPickle(Payload())}}})
        try:
            with pytest.raises(Exception, match="refusing to unpickle"):
                await scheduler_identity(server.address, {})
        finally:
            await server.close()

    asyncio.run(main())
    assert UNPICKLED == []
    # Outside the gateway's queries, Dask's unpickling is untouched.
    from distributed.protocol import pickle

    assert pickle.loads(pickle.dumps(Payload())) is None
    assert UNPICKLED == ["unpickled"]
