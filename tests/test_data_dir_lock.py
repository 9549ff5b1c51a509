"""One gateway per data directory: a second is refused and names the first; a killed one's lock is gone."""

from __future__ import annotations

import signal

from conftest import wait_gone


def test_a_second_gateway_on_the_same_data_dir_is_refused(gateway_factory) -> None:
    first = gateway_factory(local_workers=0)
    first.wait_for_workers(0)
    second = gateway_factory(local_workers=0, data_dir=first.data_dir)
    assert second.process.wait(60) != 0, second.log()[-4000:]
    log = second.log()
    assert f"pid {first.process.pid}, {first.url}" in log, log[-4000:]
    assert str(first.data_dir) in log and "--data-dir" in log, log[-4000:]
    assert first.status()["state"] == "running"
    # The registry commands are not gateways: they work while one runs.
    added, listed, invited = first.cli_many(("users", "add", "zoe"), ("users", "list"), ("invite",))
    assert added.returncode == 0, added.stderr
    assert listed.returncode == 0 and invited.returncode == 0, (listed.stderr, invited.stderr)
    assert "dash-worker join" in invited.stdout


def test_a_killed_gateways_lock_does_not_block_the_next(gateway_factory) -> None:
    first = gateway_factory(local_workers=0)
    first.wait_for_workers(0)
    ca = first.cluster()["tls"]["ca"]
    children = first.descendants()
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    assert not wait_gone(children, timeout=15)
    second = gateway_factory(local_workers=0, data_dir=first.data_dir)
    second.wait_for_workers(0)
    # The same directory: the CA is reused, not made anew.
    assert second.cluster()["tls"]["ca"] == ca
