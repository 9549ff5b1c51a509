"""Bring-your-own workers over HTTP: invites, enrolment, the machine agent's endpoints, the pool."""

from __future__ import annotations

import asyncio
import datetime
import logging
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from jupyter_server.auth.decorator import authorized
from tornado import web

from dash_gateway.auth import is_operator, username
from dash_gateway.cluster import ClusterSupervisor
from dash_gateway.handlers import (
    DashAPIHandler,
    JSONAPIHandler,
    allow_unauthenticated,
    check_schema,
    http_error,
)
from dash_gateway.registry import (
    MAX_INVITE_LIFETIME,
    AlreadyExistsError,
    InvalidNameError,
    Invite,
    InviteError,
    Machine,
    NotFoundError,
    Registry,
    RegistryError,
    StateError,
    check_machine_name,
    iso,
    sanitize_machine_name,
)
from dash_kernel.resources import format_resources

log = logging.getLogger(__name__)

MACHINE_TOKEN_HEADER = "X-Dash-Machine-Token"
# How long a certificate request waits for a scheduler that is (re)starting.
SCHEDULER_WAIT = 10.0
ACTIONS = {"pause": "paused", "resume": "active", "drain": "draining", "approve": "active"}
_STATUS = (
    (InviteError, 403),
    (InvalidNameError, 400),
    (AlreadyExistsError, 409),
    (NotFoundError, 404),
    (StateError, 409),
    (RegistryError, 400),
)


@dataclass(frozen=True)
class WorkerOptions:
    """The gateway's settings for contributed machines (``DashGateway`` traits)."""

    approve_workers: str = "auto"
    public_url: str = ""
    heartbeat_interval: float = 2.0
    heartbeat_timeout: float = 15.0
    certificate_lifetime: float = 7 * 86400.0
    invite_lifetime: float = 86400.0


def join_command(url: str, token: str) -> str:
    """The command a contributor runs on their machine."""
    return f"dash-worker join {shlex.quote(url)} --token {shlex.quote(token)}"


def invite_reply(token: str, invite: Invite, gateway: str) -> dict[str, Any]:
    """What ``POST /dash/api/invites`` and ``dash-gateway invite`` answer."""
    return {
        "token": token,
        "expires": iso(invite.expires),
        "command": join_command(gateway, token),
        "gateway": gateway,
        "owner": invite.owner,
    }


def check_caps_fit(hardware: Mapping[str, Any], caps: Mapping[str, Any]) -> None:
    """A 400 naming the cap unless ``caps`` (schema-checked) fit in ``hardware`` and share something."""
    if caps["cpus"] > hardware["cpus"]:
        raise http_error(
            400, f"caps.cpus: {caps['cpus']} is more than the machine's {hardware['cpus']} CPUs"
        )
    if caps["memory"] > hardware["memory"]:
        raise http_error(
            400,
            f"caps.memory: {caps['memory']} bytes is more than the machine's "
            f"{hardware['memory']} bytes",
        )
    known = {gpu["index"] for gpu in hardware.get("gpus", [])}
    unknown = sorted(set(caps["gpus"]) - known)
    if unknown:
        raise http_error(400, f"caps.gpus: the machine has no GPU {unknown[0]}")
    if caps["cpus"] == 0 and not caps["gpus"]:
        raise http_error(400, "caps: nothing to share (0 CPUs and no GPUs)")


def registry_http_error(exc: RegistryError) -> web.HTTPError:
    """The HTTP error for a registry refusal: its sentence, with a fitting status."""
    status = next(code for cls, code in _STATUS if isinstance(exc, cls))
    return http_error(status, str(exc))


async def live_workers(cluster: ClusterSupervisor) -> list[dict[str, Any]]:
    """The scheduler's live workers; [] when it cannot say (restarting, or no such call yet)."""
    try:
        workers = await cluster.dash_workers()
    except (AttributeError, OSError, asyncio.TimeoutError) as exc:
        log.debug("No live worker list from the scheduler: %r", exc)
        return []
    except Exception as exc:
        # The list is decoration on the registry's records: never fail the request for it.
        log.warning("Could not list the scheduler's workers: %r", exc)
        return []
    return [w for w in workers if isinstance(w, dict)]


def workers_by_machine(
    workers: Iterable[Mapping[str, Any]], machines: Iterable[str]
) -> dict[str, list[dict[str, Any]]]:
    """Live workers grouped by machine: the ``machine`` the scheduler reports, else the
    longest machine name that the worker's name starts with (``bob-gpu0`` -> ``bob``)."""
    names = sorted(machines, key=len, reverse=True)
    grouped: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for worker in workers:
        machine = worker.get("machine")
        if not isinstance(machine, str):
            wname = str(worker.get("name", ""))
            machine = next((m for m in names if wname == m or wname.startswith(m + "-")), None)
        if machine in grouped:
            grouped[machine].append(
                {
                    "name": worker.get("name"),
                    "address": worker.get("address"),
                    "status": worker.get("status"),
                    "processing": int(worker.get("processing") or 0),
                    "resources": worker.get("resources") or {},
                    # what finished on it, by kind, most recent first
                    "ran": list(worker.get("ran") or []),
                }
            )
    return grouped


def machine_record(
    machine: Machine, workers: list[dict[str, Any]], heartbeat_timeout: float
) -> dict[str, Any]:
    """The API's machine record: the registry's row plus its live workers."""
    record = machine.to_json(heartbeat_timeout)
    record["workers"] = workers
    record["current_work"] = sum(w["processing"] for w in workers)
    return record


async def live_sessions(cluster: ClusterSupervisor) -> list[dict[str, Any]]:
    """Every user's remote sessions (the scheduler's ``dash_work``); [] when it cannot say."""
    try:
        work = await cluster.dash_work()
    except Exception as exc:
        log.debug("No session list from the scheduler: %r", exc)
        return []
    return [s for s in work.get("sessions") or [] if isinstance(s, dict)]


def _holds(resources: Mapping[str, Any], need: Mapping[str, Any]) -> bool:
    return all(float(resources.get(key) or 0) >= float(amount) for key, amount in need.items())


def drain_status(
    record: Mapping[str, Any], workers: list[dict[str, Any]], sessions: list[dict[str, Any]]
) -> dict[str, Any]:
    """What draining machine ``record`` waits for: its sessions, each with whether a
    running worker of another machine could hold it, and its other running tasks."""
    name = record["name"]
    elsewhere = [w for w in workers if w.get("machine") != name and w.get("status") == "running"]
    rows = []
    for session in sessions:
        if session.get("machine") != name or session.get("state") != "running":
            continue
        need = session.get("resources") or {}
        rows.append(
            {
                "id": session.get("id"),
                "user": session.get("user"),
                "notebook": session.get("notebook"),
                "worker": session.get("worker"),
                "needs": format_resources(need),
                "movable": any(_holds(w.get("resources") or {}, need) for w in elsewhere),
            }
        )
    tasks = max(int(record.get("current_work") or 0) - len(rows), 0)
    return {"sessions": rows, "tasks": tasks, "message": drain_message(rows, tasks)}


def drain_message(sessions: list[Mapping[str, Any]], tasks: int, viewer: str | None = None) -> str:
    """ "draining: waiting for 1 session that no other machine can hold (alice's session on
    rig-gpu0, needs 1 GPU (a100))"; with ``viewer``, other users are not named."""

    def whose(row: Mapping[str, Any]) -> str:
        user = row.get("user")
        if viewer is not None and user != viewer:
            return "another user's session"
        notebook = row.get("notebook")
        return f"{user}'s " + (f"notebook {notebook}" if notebook else "session")

    def listed(rows: list[Mapping[str, Any]]) -> str:
        return ", ".join(f"{whose(r)} on {r.get('worker')}, needs {r.get('needs')}" for r in rows)

    stuck = [s for s in sessions if not s.get("movable")]
    movable = [s for s in sessions if s.get("movable")]
    parts = []
    if stuck:
        parts.append(
            f"waiting for {_count(len(stuck), 'session')} that no other machine can hold "
            f"({listed(stuck)})"
        )
    if movable:
        parts.append(
            f"waiting for {_count(len(movable), 'session')} to move to another machine at "
            f"its notebook's next cell ({listed(movable)})"
        )
    if tasks:
        parts.append(f"{_count(tasks, 'other task')} still running")
    return "draining: " + ("; ".join(parts) or "nothing left running; its workers stop")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def with_drains(
    records: list[dict[str, Any]], workers: list[dict[str, Any]], sessions: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """``records`` with a ``drain`` status on each draining one (see :func:`drain_status`)."""
    for record in records:
        if record.get("state") == "draining":
            record["drain"] = drain_status(record, workers, sessions)
    return records


def drains_for(records: list[dict[str, Any]], viewer: str, operator: bool) -> list[dict[str, Any]]:
    """``records`` as ``viewer`` may see them: the other users whose sessions hold up a
    drain are not named, not even to the machine's owner (who runs their work, but is
    owed neither their names nor their notebooks')."""
    if operator:
        return records
    shown = []
    for record in records:
        drain = record.get("drain")
        if drain:
            message = drain_message(drain["sessions"], drain["tasks"], viewer)
            sessions = [_redacted(row, viewer) for row in drain["sessions"]]
            record = {**record, "drain": {**drain, "sessions": sessions, "message": message}}
        shown.append(record)
    return shown


def _redacted(row: Mapping[str, Any], viewer: str) -> dict[str, Any]:
    """A drain's session row as ``viewer`` may see it: another user's without who or what."""
    if row.get("user") == viewer:
        return dict(row)
    return {**row, "user": None, "id": None, "notebook": None}


class _MachineAPIMixin:
    """What both families of handlers share: the registry, the options, records."""

    cluster: ClusterSupervisor
    registry: Registry
    # Not ``options``: that name is tornado's handler for the OPTIONS verb.
    worker_options: WorkerOptions

    def initialize(
        self, cluster: ClusterSupervisor, registry: Registry, worker_options: WorkerOptions
    ) -> None:
        self.cluster = cluster
        self.registry = registry
        self.worker_options = worker_options

    async def records(self, machines: list[Machine]) -> list[dict[str, Any]]:
        workers = await live_workers(self.cluster)
        grouped = workers_by_machine(workers, (m.name for m in machines))
        timeout = self.worker_options.heartbeat_timeout
        records = [machine_record(m, grouped[m.name], timeout) for m in machines]
        if not any(r["state"] == "draining" for r in records):
            return records
        return with_drains(records, workers, await live_sessions(self.cluster))

    async def record(self, machine: Machine) -> dict[str, Any]:
        return (await self.records([machine]))[0]

    def ca_pem(self) -> str:
        if self.cluster.ca is None:
            raise http_error(503, "the DASH cluster is still starting; try again shortly")
        return self.cluster.ca.cert_pem


# ----- for people (Jupyter-authenticated) --------------------------------------------------


class _PoolHandler(_MachineAPIMixin, DashAPIHandler):
    def machine_for_action(self, name: str) -> Machine:
        """The machine ``name``, if this user may act on it (its owner, or the operator)."""
        machine = self.registry.machine(name)
        if machine is None:
            raise http_error(404, f"no machine named {name!r}; GET /dash/api/workers lists them")
        if not is_operator(self) and machine.owner != username(self):
            raise http_error(
                403,
                f"machine {name!r} belongs to {machine.owner}; "
                "you can act only on your own machines",
            )
        return machine


class InvitesHandler(_PoolHandler):
    """``POST /dash/api/invites``: a one-time invite for the caller to enrol a machine."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        lifetime = body.get("expires_in", self.worker_options.invite_lifetime)
        if (
            isinstance(lifetime, bool)
            or not isinstance(lifetime, (int, float))
            or not 1 <= lifetime <= MAX_INVITE_LIFETIME
        ):
            raise http_error(
                400,
                f"expires_in must be a number of seconds from 1 to {MAX_INVITE_LIFETIME} (30 days)",
            )
        try:
            token, invite = self.registry.create_invite(username(self), float(lifetime))
        except RegistryError as exc:
            raise registry_http_error(exc) from None
        self.set_header("Cache-Control", "no-store")
        self.write_json(invite_reply(token, invite, self.gateway_url()), status=201)

    def gateway_url(self) -> str:
        if self.worker_options.public_url:
            return self.worker_options.public_url
        return f"{self.request.protocol}://{self.request.host}{self.base_url}"


class WorkersHandler(_PoolHandler):
    """``GET /dash/api/workers``: every contributed machine, with its live workers."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        records = await self.records(self.registry.machines())
        self.write_json({"workers": drains_for(records, username(self), is_operator(self))})


class WorkerHandler(_PoolHandler):
    """``DELETE /dash/api/workers/<name>``: revoke a machine and all its certificates."""

    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        self.machine_for_action(name)
        try:
            machine = self.registry.revoke_machine(name)
        except RegistryError as exc:
            raise registry_http_error(exc) from None
        log.info("Machine %s revoked by %s", name, username(self))
        self.write_json(await self.record(machine))


class WorkerActionHandler(_PoolHandler):
    """``POST /dash/api/workers/<name>/(pause|resume|drain|approve)``."""

    @web.authenticated
    @authorized
    async def post(self, name: str, action: str) -> None:
        if action == "approve":
            if not is_operator(self):
                raise http_error(403, "only the operator can approve machines")
        else:
            self.machine_for_action(name)
        try:
            if action == "approve":
                machine = self.registry.approve(name)
            else:
                machine = self.registry.set_state(name, ACTIONS[action])
        except RegistryError as exc:
            raise registry_http_error(exc) from None
        self.write_json(await self.record(machine))


# ----- for machines (their own secrets; no Jupyter login, no cookies) ----------------------


class _MachineHandler(_MachineAPIMixin, JSONAPIHandler):
    def check_xsrf_cookie(self) -> None:
        # These endpoints never use cookies: a forged cross-site request carries no secret.
        return None

    def agent_machine(self) -> Machine:
        """The machine whose token is in the request header; 403 if none or revoked."""
        token = self.request.headers.get(MACHINE_TOKEN_HEADER, "")
        if not token:
            raise http_error(403, f"no machine token: send it in the {MACHINE_TOKEN_HEADER} header")
        machine = self.registry.machine_for_token(token)
        if machine is None:
            raise http_error(
                403,
                "unknown machine token: this machine is not enrolled here (it may have left); "
                "enrol it again with a new invite (dash-worker join URL --token TOKEN)",
            )
        if machine.state == "revoked":
            raise http_error(
                403,
                f"this machine was revoked ({machine.name}); its workers may not join. "
                "Ask the gateway's operator for a new invite to enrol it again",
            )
        return machine


class EnrolHandler(_MachineHandler):
    """``POST /dash/api/enrol``: use an invite; the machine gets its token and the CA."""

    @allow_unauthenticated
    async def post(self) -> None:
        body = self.json_body()
        check_schema(body, "Enrolment")
        invite, hardware, caps = body["invite"], body["hardware"], body["caps"]
        check_caps_fit(hardware, caps)
        name = self.machine_name(body.get("name"), hardware)
        ca = self.ca_pem()
        approve = self.worker_options.approve_workers == "auto"
        try:
            machine, token = self.registry.enrol(invite, name, hardware, caps, approve=approve)
        except RegistryError as exc:
            raise registry_http_error(exc) from None
        log.info(
            "Machine %s enrolled for %s from %s (%s)",
            machine.name,
            machine.owner,
            self.request.remote_ip,
            machine.state,
        )
        self.set_header("Cache-Control", "no-store")
        self.write_json(
            {
                "name": machine.name,
                "owner": machine.owner,
                "state": machine.state,
                "machine_token": token,
                "ca": ca,
            },
            status=201,
        )

    @staticmethod
    def machine_name(name: Any, hardware: Mapping[str, Any]) -> str:
        if name is None:
            name = sanitize_machine_name(str(hardware.get("hostname") or ""))
            if not name:
                raise http_error(
                    400, "this machine has no usable host name; choose one with --name"
                )
        if not isinstance(name, str):
            raise http_error(400, "'name' must be a string or null")
        try:
            return check_machine_name(name)
        except InvalidNameError as exc:
            raise http_error(400, f"{exc}; choose another with --name") from None


class AgentHandler(_MachineHandler):
    """``GET /dash/api/agent``: this machine's record; ``DELETE``: the machine leaves."""

    @allow_unauthenticated
    async def get(self) -> None:
        self.write_json(await self.record(self.agent_machine()))

    @allow_unauthenticated
    async def delete(self) -> None:
        machine = self.agent_machine()
        try:
            self.registry.remove_machine(machine.name)
        except RegistryError as exc:
            raise registry_http_error(exc) from None
        self.write_json({"name": machine.name, "state": "removed"})


class AgentHeartbeatHandler(_MachineHandler):
    """``POST /dash/api/agent/heartbeat``: alive, with utilisation; answers state and scheduler."""

    @allow_unauthenticated
    async def post(self) -> None:
        machine = self.agent_machine()
        body = self.json_body()
        utilisation = body.get("utilisation")
        if utilisation is not None and not isinstance(utilisation, dict):
            raise http_error(400, "'utilisation' must be a JSON object or null")
        workers = body.get("workers", [])
        if not isinstance(workers, list) or not all(isinstance(w, str) for w in workers):
            raise http_error(400, "'workers' must be a list of worker names")
        try:
            if body.get("starting") and machine.state == "draining":
                # `dash-worker start` after a drain: the contributor brings the machine back.
                self.registry.set_state(machine.name, "active")
            machine = self.registry.record_heartbeat(machine.name, utilisation)
        except RegistryError as exc:
            raise registry_http_error(exc) from None
        scheduler = self.cluster.scheduler_address or None
        self.write_json(
            {
                "name": machine.name,
                "owner": machine.owner,
                "state": machine.state,
                "scheduler": None if machine.state == "pending" else scheduler,
                "heartbeat_interval": self.worker_options.heartbeat_interval,
            }
        )


class AgentCertificateHandler(_MachineHandler):
    """``POST /dash/api/agent/certificate``: sign the machine's CSR as a worker certificate."""

    @allow_unauthenticated
    async def post(self) -> None:
        machine = self.agent_machine()
        if machine.state == "pending":
            raise http_error(409, "waiting for an operator to approve this machine")
        csr = self.json_body().get("csr")
        if not isinstance(csr, str) or not csr.strip():
            raise http_error(400, "the body needs 'csr': a PEM certificate signing request")
        ca_pem = self.ca_pem()
        if getattr(self.cluster, "tenancy", "shared") == "per-user":
            raise http_error(
                503,
                "this gateway gives every user a cluster of their own (tenancy='per-user'), "
                "which contributed machines cannot serve yet; the gateway's operator can run "
                "it with --tenancy shared",
            )
        address = await self.cluster.wait_for_scheduler(SCHEDULER_WAIT)
        if not address:
            raise http_error(503, "the DASH scheduler is not running yet; try again shortly")
        assert self.cluster.ca is not None
        lifetime = datetime.timedelta(seconds=self.worker_options.certificate_lifetime)
        try:
            pem, serial = self.cluster.ca.sign_csr(csr, "worker", machine.name, valid_for=lifetime)
        except ValueError as exc:
            raise http_error(400, f"cannot sign this request: {exc}") from None
        cert = x509.load_pem_x509_certificate(pem.encode())
        record = self.registry.record_certificate(
            machine.name, serial, cert.not_valid_before_utc, cert.not_valid_after_utc
        )
        if record.revoked is not None:
            raise http_error(403, f"this machine was revoked ({machine.name}) meanwhile")
        log.info("Issued worker certificate %s to machine %s", record.serial, machine.name)
        self.set_header("Cache-Control", "no-store")
        self.write_json(
            {"cert": pem, "ca": ca_pem, "scheduler": address, "expires": iso(record.expires)}
        )


class AgentDrainHandler(_MachineHandler):
    """``POST /dash/api/agent/drain``: the machine takes no new work; running work finishes."""

    @allow_unauthenticated
    async def post(self) -> None:
        machine = self.agent_machine()
        try:
            machine = self.registry.set_state(machine.name, "draining")
        except RegistryError as exc:
            raise registry_http_error(exc) from None
        self.write_json(await self.record(machine))
