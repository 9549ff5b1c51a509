"""The ``dash-worker`` subcommands for an enrolled machine: join, start, status, drain, leave."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from collections.abc import Mapping
from typing import Any

from dask.utils import format_bytes

from dash_kernel.resources import format_resources
from dash_worker.agent import (
    API,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REVOKED,
    EXIT_USAGE,
    AgentExit,
    parse_time,
    run_agent,
    say,
)
from dash_worker.credentials import CredentialStore, MachineConfig
from dash_worker.gateway_client import GatewayClient, GatewayError, GatewayUnreachable
from dash_worker.plan import (
    CapsError,
    default_machine_name,
    gpu_identities,
    match_gpus,
    plan_workers,
    resolve_caps,
    validate_machine_name,
)
from dash_worker.probe import probe_hardware

__all__ = ["describe_caps", "drain", "format_record", "join", "leave", "start", "status"]

log = logging.getLogger(__name__)


def describe_caps(caps: Mapping[str, Any], hardware: Mapping[str, Any] | None = None) -> str:
    """``"4 CPU cores, 16 GiB memory, GPU 0 (NVIDIA H200)"``."""
    names = {int(g["index"]): g["name"] for g in (hardware or {}).get("gpus") or []}
    gpus = [f"GPU {i}" + (f" ({names[i]})" if i in names else "") for i in caps.get("gpus", [])]
    cpus = int(caps.get("cpus", 0))
    parts = [
        f"{cpus} CPU core{'' if cpus == 1 else 's'}",
        f"{format_bytes(int(caps.get('memory', 0)))} memory",
    ]
    return ", ".join(parts + (gpus or ["no GPUs"]))


def _usage(command: str, exc: Exception) -> AgentExit:
    return AgentExit(EXIT_USAGE, f"dash-worker {command}: error: {exc}")


def _load(store: CredentialStore) -> MachineConfig:
    try:
        return store.load()
    except FileNotFoundError:
        raise AgentExit(
            EXIT_ERROR,
            f"dash-worker: no machine credentials in {store.directory}: run "
            "`dash-worker join URL --token TOKEN` first (or pass the --config-dir used at join)",
        ) from None
    except (ValueError, TypeError) as exc:
        raise AgentExit(
            EXIT_ERROR, f"dash-worker: {store.machine_file} is unreadable ({exc})"
        ) from None


def join(args: argparse.Namespace) -> int:
    """``dash-worker join``: probe, enrol with the invite, store credentials, then run."""
    store = CredentialStore(args.config_dir)
    if store.exists():
        existing = _load(store)
        raise AgentExit(
            EXIT_ERROR,
            f"dash-worker: this machine already joined {existing.gateway} as {existing.name} "
            f"(credentials in {store.directory}); run `dash-worker start`, or "
            "`dash-worker leave` first, or use another --config-dir",
        )
    declared = list(args.declare_gpu or [])
    hardware = probe_hardware(args.local_directory, declared)
    try:
        caps = resolve_caps(hardware, args.cpus, args.memory, args.gpus)
        name = validate_machine_name(args.name or default_machine_name(hardware["hostname"]))
        plan_workers(name, hardware, caps, args.gpu_threads)
    except CapsError as exc:
        raise _usage("join", exc) from None
    if not hardware["gpus"]:
        log.info("no GPUs: %s", hardware["gpu_probe"])
    client = GatewayClient(args.url)
    body = {"invite": args.token, "name": name, "hardware": hardware, "caps": caps}
    try:
        reply = client.post(f"{API}/enrol", body)
    except GatewayUnreachable as exc:
        raise AgentExit(EXIT_ERROR, f"dash-worker: {exc}") from None
    except GatewayError as exc:
        raise AgentExit(EXIT_ERROR, f"dash-worker: {exc.message}") from None
    config = MachineConfig(
        gateway=client.url,
        name=str(reply["name"]),
        owner=str(reply.get("owner", "")),
        machine_token=str(reply["machine_token"]),
        caps=caps,
        declared_gpus=declared,
        gpu_identities=gpu_identities(hardware, caps["gpus"]),
        options={
            "gpu_threads": args.gpu_threads,
            "local_directory": args.local_directory,
            "host": args.host,
        },
    )
    store.save(config, ca=str(reply["ca"]))
    say(
        f"Joined {client.url} as machine {config.name} (owner {config.owner}), sharing "
        f"{describe_caps(caps, hardware)}. Credentials: {store.directory}"
    )
    if reply.get("state") == "pending":
        say("An operator must approve this machine before it takes work; waiting for that.")
    return run_agent(store, config, hardware, caps, "join")


def start(args: argparse.Namespace) -> int:
    """``dash-worker start``: run the enrolled machine's workers."""
    store = CredentialStore(args.config_dir)
    config = _load(store)
    hardware = probe_hardware(config.options.get("local_directory"), config.declared_gpus)
    caps, warnings = match_gpus(hardware, config.caps, config.gpu_identities)
    for warning in warnings:
        log.warning("%s", warning)
    return run_agent(store, config, hardware, caps, "start")


def _ago(when: str | None) -> str:
    parsed = parse_time(when)
    if parsed is None:
        return "never"
    seconds = (datetime.datetime.now(datetime.timezone.utc) - parsed).total_seconds()
    return f"{when} ({max(seconds, 0):.0f} s ago)"


def format_record(record: Mapping[str, Any], gateway: str) -> str:
    """A machine record (``GET /dash/api/agent``) as aligned lines for a terminal."""
    caps = record.get("caps") or {}
    rows = [
        ("machine", f"{record.get('name')} (owner {record.get('owner')})"),
        ("gateway", gateway),
        ("state", str(record.get("state"))),
        ("last heartbeat", _ago(record.get("last_heartbeat"))),
        ("shares", describe_caps(caps, record.get("hardware")) if caps else "-"),
    ]
    util = record.get("utilisation")
    if util:
        text = (
            f"CPU {util.get('cpu_percent', 0):.0f}%, memory "
            f"{format_bytes(int(util.get('memory_used') or 0))} of "
            f"{format_bytes(int(util.get('memory_total') or 0))}"
        )
        for gpu in util.get("gpus") or []:
            if gpu.get("utilisation") is not None:
                text += f"; GPU {gpu['index']} {gpu['utilisation']:.0f}%"
        rows.append(("load", text))
    rows.append(("running work", f"{record.get('current_work', 0)} task(s)"))
    drain = record.get("drain")
    if isinstance(drain, dict) and drain.get("message"):
        rows.append(("drain", str(drain["message"])))
    workers = record.get("workers") or []
    rows.append(("workers", "none connected" if not workers else ""))
    width = max(len(label) for label, _ in rows) + 2
    lines = [f"{label:<{width}}{value}".rstrip() for label, value in rows]
    cells = [
        (
            str(w.get("name")),
            str(w.get("status")),
            f"{w.get('processing', 0)} task(s)",
            str(w.get("address")),
            format_resources(w.get("resources") or {}),
        )
        for w in workers
    ]
    widths = [max((len(row[i]) for row in cells), default=0) for i in range(4)]
    for row in cells:
        padded = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        lines.append("  " + "  ".join([*padded, row[4]]))
    return "\n".join(lines)


def _agent_client(args: argparse.Namespace) -> tuple[CredentialStore, MachineConfig, GatewayClient]:
    store = CredentialStore(args.config_dir)
    config = _load(store)
    return store, config, GatewayClient(config.gateway, config.machine_token)


def _gateway_call(client: GatewayClient, method: str, path: str) -> Any:
    try:
        return client.request(method, f"{API}/{path}")
    except GatewayUnreachable as exc:
        raise AgentExit(EXIT_ERROR, f"dash-worker: {exc}") from None
    except GatewayError as exc:
        code = EXIT_REVOKED if exc.status == 403 else EXIT_ERROR
        raise AgentExit(code, f"dash-worker: {exc.message}") from None


def status(args: argparse.Namespace) -> int:
    """``dash-worker status``: this machine as the gateway sees it."""
    _, config, client = _agent_client(args)
    record = _gateway_call(client, "GET", "agent")
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(format_record(record, client.url))
    return EXIT_OK


def drain(args: argparse.Namespace) -> int:
    """``dash-worker drain``: no new work; the running agent exits when the work is done."""
    _, config, client = _agent_client(args)
    record = _gateway_call(client, "POST", "agent/drain")
    work = record.get("current_work", 0) if isinstance(record, dict) else 0
    running = (
        f"its {work} running task(s) finish first"
        if work
        else "it has no running work, so that is soon"
    )
    say(
        f"Machine {config.name} is draining: it takes no new work, and a running "
        f"`dash-worker start` (or join) exits by itself once its work is done; {running}."
    )
    return EXIT_OK


def leave(args: argparse.Namespace) -> int:
    """``dash-worker leave``: remove this machine from the cluster and forget its credentials."""
    store, config, client = _agent_client(args)
    note = ""
    if not args.local_only:
        try:
            client.request("DELETE", f"{API}/agent")
        except GatewayUnreachable as exc:
            raise AgentExit(
                EXIT_ERROR,
                f"dash-worker: {exc}. Nothing was changed; `dash-worker leave --local-only` "
                "deletes this machine's credentials without telling the gateway.",
            ) from None
        except GatewayError as exc:
            if exc.status != 403:
                raise AgentExit(EXIT_ERROR, f"dash-worker: {exc.message}") from None
            note = f" (the gateway had already let it go: {exc.message})"
    store.remove()
    if args.local_only:
        say(
            f"Deleted the credentials of machine {config.name} in {store.directory}; "
            f"the gateway at {config.gateway} was not told."
        )
    else:
        say(
            f"Machine {config.name} left the cluster at {config.gateway}{note}: its "
            f"certificates are revoked and its credentials in {store.directory} are deleted. "
            "A `dash-worker start` still running here stops at its next heartbeat."
        )
    return EXIT_OK
