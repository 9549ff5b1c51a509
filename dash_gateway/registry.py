"""The gateway's registry (SQLite): user accounts, invites, contributed machines and their certificates."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dash_gateway.policy import LOCAL_MACHINE, normalize_serial, policy_path, write_policy

log = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"
SCHEMA_VERSION = 1
# How long a writer waits for another process (the gateway, the CLI) to finish its transaction.
BUSY_TIMEOUT = 10.0
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
OPERATOR = "operator"
RESERVED_USERNAMES = {
    OPERATOR: "the server token's identity",
    "dash-gateway": "the gateway's own identity on the cluster",
    LOCAL_MACHINE: "the gateway's own local workers",
}
RESERVED_MACHINE_NAMES = {LOCAL_MACHINE: "the gateway's own local workers"}
MAX_INVITE_LIFETIME = 30 * 86400
# Stored machine states; "offline" is derived from the heartbeat's age and never stored.
STORED_STATES = ("pending", "active", "paused", "draining", "revoked")
# A revoked certificate stays in the policy file this long after it expired (clock skew).
REVOKED_SERIAL_GRACE = datetime.timedelta(days=1)

_SCHEMA = """
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL
);
CREATE TABLE invites (
    token_hash TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created TEXT NOT NULL,
    expires TEXT NOT NULL,
    used_at TEXT,
    machine TEXT
);
CREATE INDEX invites_owner ON invites (owner);
CREATE TABLE machines (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    hardware TEXT NOT NULL,
    caps TEXT NOT NULL,
    state TEXT NOT NULL,
    created TEXT NOT NULL,
    approved TEXT,
    last_heartbeat TEXT,
    utilisation TEXT
);
CREATE INDEX machines_owner ON machines (owner);
CREATE TABLE certificates (
    serial TEXT PRIMARY KEY,
    machine TEXT NOT NULL,
    issued TEXT NOT NULL,
    expires TEXT NOT NULL,
    revoked TEXT
);
CREATE INDEX certificates_machine ON certificates (machine);
"""


class RegistryError(Exception):
    """A request the registry refuses; ``str(error)`` is a sentence for the person who asked."""


class InvalidNameError(RegistryError):
    """A user or machine name that is malformed or reserved."""


class AlreadyExistsError(RegistryError):
    """A user or machine of that name exists already."""


class NotFoundError(RegistryError):
    """No user or machine of that name."""


class InviteError(RegistryError):
    """An invite token that cannot be used."""


class InvalidInviteError(InviteError):
    """The token is not an invite of this gateway."""


class InviteUsedError(InviteError):
    """The invite was used already (invites are single-use)."""


class InviteExpiredError(InviteError):
    """The invite's lifetime is over."""


class StateError(RegistryError):
    """The machine's state does not allow the change asked for."""


@dataclass(frozen=True)
class User:
    """An account made with ``dash-gateway users add``."""

    name: str
    created: datetime.datetime


@dataclass(frozen=True)
class Invite:
    """A one-time invite to enrol a machine; the token itself is never stored."""

    owner: str
    created: datetime.datetime
    expires: datetime.datetime
    used_at: datetime.datetime | None = None
    machine: str | None = None


@dataclass(frozen=True)
class Machine:
    """A contributed machine as stored (its state is never "offline"; see :meth:`effective_state`)."""

    name: str
    owner: str
    state: str
    hardware: dict[str, Any]
    caps: dict[str, Any]
    created: datetime.datetime
    approved: datetime.datetime | None
    last_heartbeat: datetime.datetime | None
    utilisation: dict[str, Any] | None

    def effective_state(
        self, heartbeat_timeout: float, now: datetime.datetime | None = None
    ) -> str:
        """The stored state, or "offline" for an admitted machine not heard from in time."""
        if self.state not in ("active", "paused", "draining"):
            return self.state
        seen = self.last_heartbeat or self.created
        age = ((now or utcnow()) - seen).total_seconds()
        return "offline" if age > heartbeat_timeout else self.state

    def to_json(self, heartbeat_timeout: float) -> dict[str, Any]:
        """The registry's part of the API's machine record."""
        return {
            "name": self.name,
            "owner": self.owner,
            "state": self.effective_state(heartbeat_timeout),
            "hardware": self.hardware,
            "caps": self.caps,
            "created": iso(self.created),
            "approved": iso(self.approved),
            "last_heartbeat": iso(self.last_heartbeat),
            "utilisation": self.utilisation,
        }


@dataclass(frozen=True)
class Certificate:
    """A certificate issued to a machine (serial as upper-case hex)."""

    serial: str
    machine: str
    issued: datetime.datetime
    expires: datetime.datetime
    revoked: datetime.datetime | None


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def iso(moment: datetime.datetime | None) -> str | None:
    """ISO-8601 UTC to the second, as the API writes times (``2025-01-31T12:00:00Z``)."""
    if moment is None:
        return None
    return (
        moment.astimezone(datetime.timezone.utc)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


def hash_token(token: str) -> str:
    """The sha256 hex digest under which a token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random URL-safe token that never starts with ``-``, which a command line would take
    for an option (``--token -abc``)."""
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def check_username(name: str) -> str:
    """``name`` if it may name an account; else :class:`InvalidNameError` saying why."""
    return _check_name(name, "user name", RESERVED_USERNAMES)


def check_machine_name(name: str) -> str:
    """``name`` if it may name a machine; else :class:`InvalidNameError` saying why."""
    return _check_name(name, "machine name", RESERVED_MACHINE_NAMES)


def sanitize_machine_name(hostname: str) -> str:
    """A machine name made from a host name (``Alice's Laptop.local`` -> ``alice-s-laptop``)."""
    label = hostname.strip().split(".", 1)[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", label)
    label = re.sub(r"-{2,}", "-", label).strip("-")
    return label[:40].rstrip("-")


def _check_name(name: str, what: str, reserved: Mapping[str, str]) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise InvalidNameError(
            f"invalid {what} {name!r}: use 1 to 40 lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    if name in reserved:
        raise InvalidNameError(f"{name!r} is reserved ({reserved[name]}); choose another name")
    return name


def _store_time(moment: datetime.datetime | None) -> str | None:
    # Fixed width with microseconds, so stored times also sort as text.
    if moment is None:
        return None
    return moment.astimezone(datetime.timezone.utc).isoformat(timespec="microseconds")


def _load_time(text: str | None) -> datetime.datetime | None:
    return None if text is None else datetime.datetime.fromisoformat(text)


def _load_json(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _machine(row: sqlite3.Row) -> Machine:
    return Machine(
        name=row["name"],
        owner=row["owner"],
        state=row["state"],
        hardware=json.loads(row["hardware"]),
        caps=json.loads(row["caps"]),
        created=_load_time(row["created"]),  # type: ignore[arg-type]
        approved=_load_time(row["approved"]),
        last_heartbeat=_load_time(row["last_heartbeat"]),
        utilisation=_load_json(row["utilisation"]),
    )


def _invite(row: sqlite3.Row) -> Invite:
    return Invite(
        owner=row["owner"],
        created=_load_time(row["created"]),  # type: ignore[arg-type]
        expires=_load_time(row["expires"]),  # type: ignore[arg-type]
        used_at=_load_time(row["used_at"]),
        machine=row["machine"],
    )


class Registry:
    """The SQLite registry in ``<data_dir>/registry.sqlite3`` (created on first use).

    Every method is one short transaction on its own connection, so the gateway and the
    ``dash-gateway`` CLI may use the same file at once. Whenever a machine's state or a
    certificate changes, the cluster policy file is rewritten in the same transaction.
    """

    def __init__(self, data_dir: str | os.PathLike[str]):
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / REGISTRY_FILE
        self.policy_path = policy_path(self.data_dir)
        self._create()

    # ----- plumbing --------------------------------------------------------------------

    def _create(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # Token hashes live here: the file (and SQLite's -wal/-shm, which copy its mode) is private.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            with self._transaction(conn):
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                if version == SCHEMA_VERSION:
                    return
                if version > SCHEMA_VERSION:
                    raise RegistryError(
                        f"{self.path} was written by a newer DASH (schema {version}, this one "
                        f"knows {SCHEMA_VERSION}); upgrade DASH or use another --data-dir"
                    )
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        log.info("Created the DASH registry %s", self.path)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
            # With WAL this cannot corrupt the file; a power cut may lose the last heartbeats.
            conn.execute("PRAGMA synchronous = NORMAL")
            yield conn
        finally:
            conn.close()

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front: read-then-write never deadlocks or
        # fails half-way because another process wrote in between.
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn, self._transaction(conn):
            yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            yield conn

    def get_meta(self, key: str, default: str | None = None) -> str | None:
        """A small fact the gateway keeps here (e.g. ``gateway_url``)."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    # ----- users -----------------------------------------------------------------------

    def add_user(self, name: str) -> tuple[User, str]:
        """Create an account; return it and its API token (shown once, stored only hashed)."""
        check_username(name)
        token = new_token()
        user = User(name=name, created=utcnow())
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone():
                raise AlreadyExistsError(f"a user named {name!r} already exists")
            conn.execute(
                "INSERT INTO users (name, token_hash, created) VALUES (?, ?, ?)",
                (name, hash_token(token), _store_time(user.created)),
            )
        log.info("Added user %s", name)
        return user, token

    def remove_user(self, name: str) -> int:
        """Delete an account and its unused invites; return how many machines it still owns."""
        with self._write() as conn:
            if not conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount:
                raise NotFoundError(
                    f"no user named {name!r}; 'dash-gateway users list' shows the users"
                )
            conn.execute("DELETE FROM invites WHERE owner = ? AND used_at IS NULL", (name,))
            owned = conn.execute("SELECT COUNT(*) FROM machines WHERE owner = ?", (name,))
            count = int(owned.fetchone()[0])
        log.info("Removed user %s", name)
        return count

    def list_users(self) -> list[User]:
        with self._read() as conn:
            rows = conn.execute("SELECT name, created FROM users ORDER BY name").fetchall()
        return [User(name=r["name"], created=_load_time(r["created"])) for r in rows]  # type: ignore[arg-type]

    def get_user(self, name: str) -> User | None:
        with self._read() as conn:
            row = conn.execute("SELECT name, created FROM users WHERE name = ?", (name,)).fetchone()
        return User(name=row["name"], created=_load_time(row["created"])) if row else None  # type: ignore[arg-type]

    def user_for_token(self, token: str) -> str | None:
        """The account whose token this is, or None."""
        if not token:
            return None
        with self._read() as conn:
            row = conn.execute(
                "SELECT name FROM users WHERE token_hash = ?", (hash_token(token),)
            ).fetchone()
        return row["name"] if row else None

    def user_exists(self, name: str) -> bool:
        return name == OPERATOR or self.get_user(name) is not None

    # ----- invites ---------------------------------------------------------------------

    def create_invite(self, owner: str, lifetime: float) -> tuple[str, Invite]:
        """A one-time invite for ``owner`` valid ``lifetime`` seconds; return its token and it."""
        if not 0 < lifetime <= MAX_INVITE_LIFETIME:
            raise RegistryError(
                f"an invite's lifetime must be between 1 and {MAX_INVITE_LIFETIME} seconds "
                f"(30 days), not {lifetime:g}"
            )
        token = new_token()
        now = utcnow()
        invite = Invite(
            owner=owner, created=now, expires=now + datetime.timedelta(seconds=lifetime)
        )
        with self._write() as conn:
            if (
                owner != OPERATOR
                and not conn.execute("SELECT 1 FROM users WHERE name = ?", (owner,)).fetchone()
            ):
                raise NotFoundError(
                    f"no user named {owner!r} to own the invite; create one with "
                    f"'dash-gateway users add {owner}'"
                )
            conn.execute(
                "INSERT INTO invites (token_hash, owner, created, expires) VALUES (?, ?, ?, ?)",
                (hash_token(token), owner, _store_time(now), _store_time(invite.expires)),
            )
        return token, invite

    def consume_invite(self, token: str, machine: str) -> Invite:
        """Use an invite up for ``machine`` (once only); :class:`InviteError` if it cannot be used."""
        with self._write() as conn:
            invite = self._usable_invite(conn, token)
            return self._mark_used(conn, token, invite, machine)

    def _usable_invite(self, conn: sqlite3.Connection, token: str) -> Invite:
        row = None
        if isinstance(token, str) and token:
            row = conn.execute(
                "SELECT * FROM invites WHERE token_hash = ?", (hash_token(token),)
            ).fetchone()
        if row is None:
            raise InvalidInviteError("invalid invite token")
        invite = _invite(row)
        if invite.used_at is not None:
            raise InviteUsedError(
                f"this invite was already used (machine {invite.machine}, at {iso(invite.used_at)})"
            )
        if invite.expires <= utcnow():
            raise InviteExpiredError(f"this invite expired at {iso(invite.expires)}")
        return invite

    def _mark_used(
        self, conn: sqlite3.Connection, token: str, invite: Invite, machine: str
    ) -> Invite:
        used_at = utcnow()
        # The guard on used_at makes the use atomic even without the write lock.
        updated = conn.execute(
            "UPDATE invites SET used_at = ?, machine = ? WHERE token_hash = ? AND used_at IS NULL",
            (_store_time(used_at), machine, hash_token(token)),
        ).rowcount
        if not updated:
            raise InviteUsedError("this invite was already used")
        return Invite(invite.owner, invite.created, invite.expires, used_at, machine)

    # ----- machines --------------------------------------------------------------------

    def enrol(
        self,
        invite_token: str,
        name: str,
        hardware: Mapping[str, Any],
        caps: Mapping[str, Any],
        *,
        approve: bool,
    ) -> tuple[Machine, str]:
        """Use an invite to register machine ``name`` for the invite's owner, all or nothing.

        Returns the machine and its machine token (shown once). The invite stays unused if
        the name is taken, so the contributor can retry with another name.
        """
        check_machine_name(name)
        with self._write() as conn:
            invite = self._usable_invite(conn, invite_token)
            machine, token = self._insert_machine(
                conn, name, invite.owner, hardware, caps, "active" if approve else "pending"
            )
            self._mark_used(conn, invite_token, invite, name)
            self._write_policy(conn)
        log.debug("Enrolled machine %s for %s (%s)", name, machine.owner, machine.state)
        return machine, token

    def add_machine(
        self,
        name: str,
        owner: str,
        hardware: Mapping[str, Any],
        caps: Mapping[str, Any],
        state: str = "active",
    ) -> tuple[Machine, str]:
        """Register a machine directly (no invite); return it and its machine token."""
        check_machine_name(name)
        if state not in ("active", "pending"):
            raise ValueError(f"a new machine is active or pending, not {state!r}")
        with self._write() as conn:
            machine, token = self._insert_machine(conn, name, owner, hardware, caps, state)
            self._write_policy(conn)
        return machine, token

    def _insert_machine(
        self,
        conn: sqlite3.Connection,
        name: str,
        owner: str,
        hardware: Mapping[str, Any],
        caps: Mapping[str, Any],
        state: str,
    ) -> tuple[Machine, str]:
        if conn.execute("SELECT 1 FROM machines WHERE name = ?", (name,)).fetchone():
            raise AlreadyExistsError(
                f"a machine named {name} is already registered; choose another with --name"
            )
        token = new_token()
        now = utcnow()
        machine = Machine(
            name=name,
            owner=owner,
            state=state,
            hardware=dict(hardware),
            caps=dict(caps),
            created=now,
            approved=now if state == "active" else None,
            last_heartbeat=None,
            utilisation=None,
        )
        conn.execute(
            "INSERT INTO machines (name, owner, token_hash, hardware, caps, state, created, "
            "approved) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                owner,
                hash_token(token),
                json.dumps(machine.hardware),
                json.dumps(machine.caps),
                state,
                _store_time(now),
                _store_time(machine.approved),
            ),
        )
        return machine, token

    def machines(self) -> list[Machine]:
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM machines ORDER BY name").fetchall()
        return [_machine(r) for r in rows]

    def machine(self, name: str) -> Machine | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM machines WHERE name = ?", (name,)).fetchone()
        return _machine(row) if row else None

    def machine_for_token(self, token: str) -> Machine | None:
        """The machine whose machine token this is (revoked ones included), or None."""
        if not token:
            return None
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM machines WHERE token_hash = ?", (hash_token(token),)
            ).fetchone()
        return _machine(row) if row else None

    def set_state(self, name: str, state: str) -> Machine:
        """Pause, resume (active) or drain a machine; :class:`StateError` if its state forbids it."""
        if state == "revoked":
            return self.revoke_machine(name)
        if state not in ("active", "paused", "draining"):
            raise ValueError(f"set_state takes active, paused, draining or revoked, not {state!r}")
        with self._write() as conn:
            machine = self._get_machine(conn, name)
            if machine.state == "revoked":
                raise StateError(
                    f"machine {name!r} was revoked; it must enrol again with a new invite"
                )
            if machine.state == "pending":
                raise StateError(f"machine {name!r} is waiting for an operator to approve it")
            if machine.state != state:
                conn.execute("UPDATE machines SET state = ? WHERE name = ?", (state, name))
                self._write_policy(conn)
                log.info("Machine %s: %s -> %s", name, machine.state, state)
            return self._get_machine(conn, name)

    def approve(self, name: str) -> Machine:
        """Admit a pending machine (it becomes active); an approved one is left as it is."""
        with self._write() as conn:
            machine = self._get_machine(conn, name)
            if machine.state == "revoked":
                raise StateError(
                    f"machine {name!r} was revoked; it must enrol again with a new invite"
                )
            if machine.state == "pending":
                conn.execute(
                    "UPDATE machines SET state = 'active', approved = ? WHERE name = ?",
                    (_store_time(utcnow()), name),
                )
                self._write_policy(conn)
                log.info("Machine %s approved", name)
            return self._get_machine(conn, name)

    def record_heartbeat(self, name: str, utilisation: Mapping[str, Any] | None) -> Machine:
        """Note that ``name`` is alive now, with its latest utilisation."""
        with self._write() as conn:
            updated = conn.execute(
                "UPDATE machines SET last_heartbeat = ?, utilisation = ? WHERE name = ?",
                (
                    _store_time(utcnow()),
                    None if utilisation is None else json.dumps(dict(utilisation)),
                    name,
                ),
            ).rowcount
            if not updated:
                raise self._unknown(name)
            return self._get_machine(conn, name)

    def record_certificate(
        self, machine: str, serial: int | str, issued: datetime.datetime, expires: datetime.datetime
    ) -> Certificate:
        """Remember a certificate issued to ``machine``, so revoking the machine revokes it."""
        serial = normalize_serial(serial)
        with self._write() as conn:
            row = conn.execute("SELECT state FROM machines WHERE name = ?", (machine,)).fetchone()
            # Revoked (or gone) while the certificate was being signed: born revoked.
            revoked = None if row is not None and row["state"] != "revoked" else utcnow()
            conn.execute(
                "INSERT INTO certificates (serial, machine, issued, expires, revoked) "
                "VALUES (?, ?, ?, ?, ?)",
                (serial, machine, _store_time(issued), _store_time(expires), _store_time(revoked)),
            )
            self._write_policy(conn)
        return Certificate(serial, machine, issued, expires, revoked)

    def certificates(self, machine: str | None = None) -> list[Certificate]:
        with self._read() as conn:
            if machine is None:
                rows = conn.execute("SELECT * FROM certificates ORDER BY issued").fetchall()
            else:
                rows = conn.execute(
                    "SELECT * FROM certificates WHERE machine = ? ORDER BY issued", (machine,)
                ).fetchall()
        return [
            Certificate(
                serial=r["serial"],
                machine=r["machine"],
                issued=_load_time(r["issued"]),  # type: ignore[arg-type]
                expires=_load_time(r["expires"]),  # type: ignore[arg-type]
                revoked=_load_time(r["revoked"]),
            )
            for r in rows
        ]

    def revoke_machine(self, name: str) -> Machine:
        """Mark the machine revoked and revoke every certificate it was issued."""
        with self._write() as conn:
            self._get_machine(conn, name)
            conn.execute("UPDATE machines SET state = 'revoked' WHERE name = ?", (name,))
            self._revoke_certificates(conn, name)
            self._write_policy(conn)
            log.debug("Machine %s revoked", name)
            return self._get_machine(conn, name)

    def remove_machine(self, name: str) -> None:
        """Forget the machine (it left) and revoke every certificate it was issued."""
        with self._write() as conn:
            if not conn.execute("DELETE FROM machines WHERE name = ?", (name,)).rowcount:
                raise self._unknown(name)
            self._revoke_certificates(conn, name)
            self._write_policy(conn)
        log.info("Machine %s removed", name)

    def write_policy(self) -> None:
        """Rewrite the cluster policy file from the registry (e.g. when the gateway starts)."""
        with self._write() as conn:
            self._write_policy(conn)

    def _revoke_certificates(self, conn: sqlite3.Connection, name: str) -> None:
        conn.execute(
            "UPDATE certificates SET revoked = ? WHERE machine = ? AND revoked IS NULL",
            (_store_time(utcnow()), name),
        )

    def _write_policy(self, conn: sqlite3.Connection) -> None:
        # Written while holding the write lock, so concurrent writers cannot leave an
        # older snapshot in the file than the registry holds.
        machines = {r["name"]: r["state"] for r in conn.execute("SELECT name, state FROM machines")}
        cutoff = _store_time(utcnow() - REVOKED_SERIAL_GRACE)
        serials = [
            r["serial"]
            for r in conn.execute(
                "SELECT serial FROM certificates WHERE revoked IS NOT NULL AND expires > ?",
                (cutoff,),
            )
        ]
        write_policy(self.policy_path, machines, serials)

    def _get_machine(self, conn: sqlite3.Connection, name: str) -> Machine:
        row = conn.execute("SELECT * FROM machines WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise self._unknown(name)
        return _machine(row)

    @staticmethod
    def _unknown(name: str) -> NotFoundError:
        return NotFoundError(f"no machine named {name!r}; GET /dash/api/workers lists them")
