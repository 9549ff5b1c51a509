"""Bring-your-own workers: invites, enrolment, the agent's endpoints, pool actions, revocation, restarts."""

from __future__ import annotations

import datetime
import json
import sqlite3
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from dash_gateway.policy import normalize_serial, read_policy
from dash_gateway.registry import (
    AlreadyExistsError,
    InvalidInviteError,
    InviteUsedError,
    Registry,
    StateError,
)
from dash_gateway.tls import CertificateAuthority

TOKEN_HEADER = "X-Dash-Machine-Token"
HARDWARE = {"hostname": "Test-Box.example.org", "cpus": 4, "memory": 8 * 2**30, "gpus": []}
CAPS = {"cpus": 2, "memory": 4 * 2**30, "gpus": []}


# ----- helpers -------------------------------------------------------------------------


def invite(gw: Gateway, token: str = "", **body: Any) -> dict[str, Any]:
    code, reply = gw.call("POST", "dash/api/invites", body, token=token)
    assert code == 201, reply
    return reply


def enrol(gw: Gateway, invite_token: str, name: str | None, **extra: Any) -> tuple[int, Any]:
    body = {"invite": invite_token, "name": name, "hardware": HARDWARE, "caps": CAPS, **extra}
    return gw.call("POST", "dash/api/enrol", body, token=None)


def enrolled(gw: Gateway, name: str, owner_token: str = "") -> dict[str, Any]:
    """A machine enrolled with a fresh invite of the given user (default: the operator)."""
    code, reply = enrol(gw, invite(gw, owner_token)["token"], name)
    assert code == 201, reply
    return reply


def agent(gw: Gateway, machine_token: str, method: str, path: str, body: Any = None):
    return gw.call(
        method,
        "dash/api/agent" + path,
        body,
        token=None,
        headers={TOKEN_HEADER: machine_token},
    )


def make_csr(
    common_name: str = "whatever-the-machine-asks",
) -> tuple[str, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode(), key


def workers_by_name(gw: Gateway, token: str = "") -> dict[str, dict[str, Any]]:
    code, reply = gw.call("GET", "dash/api/workers", token=token)
    assert code == 200, reply
    return {record["name"]: record for record in reply["workers"]}


def policy(gw: Gateway):
    return read_policy(gw.data_dir / "cluster-policy.json")


@pytest.fixture(scope="module")
def gw(bare_gateway: Gateway) -> Gateway:
    return bare_gateway


@pytest.fixture(scope="module")
def accounts(gw: Gateway) -> dict[str, str]:
    return gw.add_users("alice", "bob")


# ----- invites -------------------------------------------------------------------------


def test_an_invite_says_how_to_join(gw: Gateway) -> None:
    before = datetime.datetime.now(datetime.timezone.utc)
    reply = invite(gw)
    assert set(reply) == {"token", "expires", "command", "gateway", "owner"}
    assert reply["owner"] == "operator"
    assert reply["gateway"] == gw.url
    assert reply["command"] == f"dash-worker join {gw.url} --token {reply['token']}"
    expires = datetime.datetime.fromisoformat(reply["expires"].replace("Z", "+00:00"))
    assert abs((expires - before).total_seconds() - 86400) < 60

    short = invite(gw, expires_in=60)
    expires = datetime.datetime.fromisoformat(short["expires"].replace("Z", "+00:00"))
    assert abs((expires - before).total_seconds() - 60) < 60
    assert short["token"] != reply["token"]
    # Only the token's hash is stored.
    assert reply["token"].encode() not in (gw.data_dir / "registry.sqlite3").read_bytes()


@pytest.mark.parametrize("expires_in", [0, -5, 31 * 86400, "soon", True])
def test_a_bad_invite_lifetime_is_refused(gw: Gateway, expires_in: Any) -> None:
    code, reply = gw.call("POST", "dash/api/invites", {"expires_in": expires_in})
    assert code == 400, reply
    assert "expires_in must be a number of seconds" in reply["message"]


def test_an_accounts_invite_is_theirs(gw: Gateway, accounts: dict[str, str]) -> None:
    assert invite(gw, accounts["alice"])["owner"] == "alice"


def test_the_invite_command_uses_the_recorded_gateway_url(gw: Gateway) -> None:
    result = gw.cli("invite", "--expires", "120", "--json")
    assert result.returncode == 0, result.stderr
    reply = json.loads(result.stdout)
    assert reply["gateway"] == gw.url and reply["owner"] == "operator"
    assert reply["command"] == f"dash-worker join {gw.url} --token {reply['token']}"
    code, body = enrol(gw, reply["token"], "from-the-cli")
    assert code == 201, body


# ----- enrolment -----------------------------------------------------------------------


def test_enrol_uses_an_invite_once(gw: Gateway) -> None:
    token = invite(gw)["token"]
    code, reply = enrol(gw, token, "box-1")
    assert code == 201, reply
    assert set(reply) == {"name", "owner", "state", "machine_token", "ca"}
    assert (reply["name"], reply["owner"], reply["state"]) == ("box-1", "operator", "active")
    assert reply["ca"] == (gw.data_dir / "tls" / "ca.pem").read_text()

    code, again = enrol(gw, token, "box-2")
    assert code == 403, again
    assert again["message"].startswith("this invite was already used (machine box-1, at ")

    code, garbage = enrol(gw, "not-an-invite", "box-3")
    assert code == 403 and garbage["message"] == "invalid invite token", garbage
    # Secrets stay out of the log.
    assert token not in gw.log() and reply["machine_token"] not in gw.log()


def test_an_expired_invite_is_refused(gw: Gateway) -> None:
    token = invite(gw, expires_in=1)["token"]
    time.sleep(1.5)
    code, reply = enrol(gw, token, "late-box")
    assert code == 403, reply
    assert reply["message"].startswith("this invite expired at "), reply


def test_a_taken_name_leaves_the_invite_unused(gw: Gateway) -> None:
    enrolled(gw, "taken")
    token = invite(gw)["token"]
    code, reply = enrol(gw, token, "taken")
    assert code == 409, reply
    assert reply["message"] == (
        "a machine named taken is already registered; choose another with --name"
    )
    code, reply = enrol(gw, token, "not-taken")
    assert code == 201, reply


@pytest.mark.parametrize(
    ("name", "status", "message"),
    [
        ("Bad_Name", 400, "invalid machine name 'Bad_Name'"),
        ("local", 400, "'local' is reserved"),
        (None, 201, None),
    ],
)
def test_machine_names(gw: Gateway, name: str | None, status: int, message: str | None) -> None:
    code, reply = enrol(gw, invite(gw)["token"], name)
    assert code == status, reply
    if message:
        assert message in reply["message"] and "--name" in reply["message"], reply
    else:
        assert reply["name"] == "test-box"  # from the host name


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"name": "x"}'])
def test_enrol_says_what_is_wrong_with_the_body(gw: Gateway, body: bytes) -> None:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(gw.url + "dash/api/enrol", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400
    assert json.loads(info.value.read())["message"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"caps": {**CAPS, "cpus": -3}}, "caps.cpus"),
        ({"caps": {**CAPS, "cpus": "2"}}, "caps.cpus"),
        ({"caps": {**CAPS, "cpus": True}}, "caps.cpus"),
        ({"caps": {**CAPS, "memory": 0}}, "caps.memory"),
        ({"caps": {**CAPS, "memory": 1.5}}, "caps.memory"),
        ({"caps": {**CAPS, "gpus": [-1]}}, "caps.gpus.0"),
        ({"caps": {**CAPS, "gpus": "all"}}, "caps.gpus"),
        ({"caps": {"cpus": 2, "memory": 2**30}}, "caps"),
        ({"caps": {**CAPS, "cpus": 5}}, "caps.cpus"),
        ({"caps": {**CAPS, "memory": 9 * 2**30}}, "caps.memory"),
        ({"caps": {**CAPS, "gpus": [0]}}, "caps.gpus"),
        ({"caps": {**CAPS, "cpus": 0}}, "caps"),
        ({"hardware": {**HARDWARE, "cpus": 0}}, "hardware.cpus"),
        ({"hardware": {**HARDWARE, "memory": -1}}, "hardware.memory"),
        ({"hardware": {**HARDWARE, "gpus": [{"index": -1, "name": "x"}]}}, "hardware.gpus.0.index"),
        ({"hardware": {**HARDWARE, "hostname": 7}}, "hardware.hostname"),
        ({"hardware": None}, "hardware"),
        ({"invite": 5}, "invite"),
    ],
)
def test_enrol_refuses_bad_hardware_and_caps(gw: Gateway, change: dict, field: str) -> None:
    token = invite(gw)["token"]
    code, reply = enrol(gw, token, "capped-box", **change)
    assert code == 400, reply
    assert reply["message"].startswith(f"{field}: "), reply
    # Refused before the invite is used: it still works with sane values.
    code, reply = enrol(gw, token, "capped-box")
    assert code == 201, reply
    assert workers_by_name(gw)["capped-box"]["caps"] == CAPS
    assert agent(gw, reply["machine_token"], "DELETE", "")[0] == 200


# ----- the agent -----------------------------------------------------------------------


def test_agent_heartbeat_and_certificate(gw: Gateway) -> None:
    machine = enrolled(gw, "gpu-box")
    token = machine["machine_token"]
    utilisation = {"cpu_percent": 12.5, "memory_used": 1, "memory_total": 2, "gpus": []}
    code, beat = agent(gw, token, "POST", "/heartbeat", {"utilisation": utilisation, "workers": []})
    assert code == 200, beat
    assert beat["name"] == "gpu-box" and beat["owner"] == "operator"
    assert beat["state"] == "active"
    assert beat["scheduler"].startswith("tls://")
    assert beat["heartbeat_interval"] == 2.0

    record = workers_by_name(gw)["gpu-box"]
    assert record["utilisation"] == utilisation
    assert record["last_heartbeat"] is not None and record["state"] == "active"
    assert record["hardware"] == HARDWARE and record["caps"] == CAPS
    assert record["workers"] == [] and record["current_work"] == 0
    code, own = agent(gw, token, "GET", "")
    assert code == 200 and own["name"] == "gpu-box", own

    csr, key = make_csr()
    code, reply = agent(gw, token, "POST", "/certificate", {"csr": csr})
    assert code == 200, reply
    assert set(reply) == {"cert", "ca", "scheduler", "expires"}
    cert = x509.load_pem_x509_certificate(reply["cert"].encode())
    ca = x509.load_pem_x509_certificate(reply["ca"].encode())
    cert.verify_directly_issued_by(ca)
    # The CSR's subject is ignored: the gateway names the machine.
    subject = {a.oid: a.value for a in cert.subject}
    assert subject[NameOID.ORGANIZATIONAL_UNIT_NAME] == "worker"
    assert subject[NameOID.COMMON_NAME] == "gpu-box"
    assert subject[NameOID.ORGANIZATION_NAME] == "DASH"
    assert cert.public_key() == key.public_key()
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=6) < lifetime <= datetime.timedelta(days=7)
    assert reply["scheduler"] == beat["scheduler"]


@pytest.mark.parametrize(
    ("headers", "message"),
    [({}, "no machine token"), ({TOKEN_HEADER: "forged"}, "unknown machine token")],
)
def test_agent_endpoints_need_a_machine_token(
    gw: Gateway, headers: dict[str, str], message: str
) -> None:
    for method, path in [("POST", "/heartbeat"), ("POST", "/certificate"), ("GET", "")]:
        code, reply = gw.call(method, "dash/api/agent" + path, {}, token=None, headers=headers)
        assert code == 403, reply
        assert reply["message"].startswith(message), reply
    # The server's own token is no machine token either.
    code, reply = gw.call("GET", "dash/api/agent")
    assert code == 403, reply


def test_a_bad_csr_is_refused(gw: Gateway) -> None:
    token = enrolled(gw, "csr-box")["machine_token"]
    code, reply = agent(gw, token, "POST", "/certificate", {"csr": "not a csr"})
    assert code == 400 and "certificate signing request" in reply["message"], reply
    code, reply = agent(gw, token, "POST", "/certificate", {})
    assert code == 400 and "csr" in reply["message"], reply


def test_the_agent_drains_and_leaves(gw: Gateway) -> None:
    machine = enrolled(gw, "leaver")
    token = machine["machine_token"]
    code, reply = agent(gw, token, "POST", "/certificate", {"csr": make_csr()[0]})
    assert code == 200, reply
    serial = normalize_serial(x509.load_pem_x509_certificate(reply["cert"].encode()).serial_number)

    code, reply = agent(gw, token, "POST", "/drain")
    assert code == 200 and reply["state"] == "draining", reply
    assert policy(gw).machines["leaver"] == "draining"

    code, reply = agent(gw, token, "DELETE", "")
    assert code == 200 and reply == {"name": "leaver", "state": "removed"}, reply
    assert "leaver" not in workers_by_name(gw)
    assert "leaver" not in policy(gw).machines
    assert serial in policy(gw).revoked_serials
    code, reply = agent(gw, token, "POST", "/heartbeat", {})
    assert code == 403 and reply["message"].startswith("unknown machine token"), reply


# ----- the pool: who may do what --------------------------------------------------------


def test_owners_and_the_operator_act_on_machines(gw: Gateway, accounts: dict[str, str]) -> None:
    alice, bob = accounts["alice"], accounts["bob"]
    enrolled(gw, "alices-box", alice)
    assert workers_by_name(gw, bob)["alices-box"]["owner"] == "alice"  # everyone sees the pool

    code, reply = gw.call("POST", "dash/api/workers/alices-box/pause", token=bob)
    assert code == 403, reply
    assert reply["message"] == (
        "machine 'alices-box' belongs to alice; you can act only on your own machines"
    )
    code, reply = gw.call("DELETE", "dash/api/workers/alices-box", token=bob)
    assert code == 403, reply

    for who, action, state in [
        (alice, "pause", "paused"),
        ("", "resume", "active"),
        (alice, "drain", "draining"),
        (alice, "resume", "active"),
    ]:
        code, reply = gw.call("POST", f"dash/api/workers/alices-box/{action}", token=who)
        assert code == 200 and reply["state"] == state, (action, reply)
        assert policy(gw).machines["alices-box"] == state

    code, reply = gw.call("POST", "dash/api/workers/alices-box/approve", token=alice)
    assert code == 403 and reply["message"] == "only the operator can approve machines", reply
    code, reply = gw.call("POST", "dash/api/workers/no-such-box/pause")
    assert code == 404 and "no machine named 'no-such-box'" in reply["message"], reply
    code, reply = gw.call("POST", "dash/api/workers/alices-box/pause", token=None)
    assert code == 403, reply


def test_delete_revokes_the_machine_and_its_certificates(
    gw: Gateway, accounts: dict[str, str]
) -> None:
    machine = enrolled(gw, "doomed", accounts["alice"])
    token = machine["machine_token"]
    serials = []
    for _ in range(2):
        code, reply = agent(gw, token, "POST", "/certificate", {"csr": make_csr()[0]})
        assert code == 200, reply
        cert = x509.load_pem_x509_certificate(reply["cert"].encode())
        serials.append(normalize_serial(cert.serial_number))
    assert not set(serials) & policy(gw).revoked_serials

    code, reply = gw.call("DELETE", "dash/api/workers/doomed", token=accounts["alice"])
    assert code == 200 and reply["state"] == "revoked", reply
    current = policy(gw)
    assert current.machines["doomed"] == "revoked"
    assert set(serials) <= current.revoked_serials
    assert not current.admits("doomed")

    code, reply = agent(gw, token, "POST", "/heartbeat", {})
    assert code == 403 and reply["message"].startswith("this machine was revoked"), reply
    code, reply = gw.call("POST", "dash/api/workers/doomed/resume")
    assert code == 409 and "revoked" in reply["message"], reply


# ----- manual approval and a restart -----------------------------------------------------


def test_manual_approval_and_a_restart(gateway_factory) -> None:
    gw = gateway_factory(local_workers=0, extra=["--DashGateway.approve_workers=manual"])
    gw.wait_for_workers(0)
    try:
        tokens = gw.add_users("frank")
        code, machine = enrol(gw, invite(gw, tokens["frank"])["token"], "waiting-box")
        assert code == 201 and machine["state"] == "pending", machine
        token = machine["machine_token"]
        assert policy(gw).machines["waiting-box"] == "pending"
        assert not policy(gw).admits("waiting-box")

        code, beat = agent(gw, token, "POST", "/heartbeat", {})
        assert code == 200 and beat["state"] == "pending" and beat["scheduler"] is None, beat
        code, reply = agent(gw, token, "POST", "/certificate", {"csr": make_csr()[0]})
        assert code == 409, reply
        assert reply["message"] == "waiting for an operator to approve this machine"
        code, reply = gw.call("POST", "dash/api/workers/waiting-box/resume", token=tokens["frank"])
        assert code == 409 and "waiting for an operator" in reply["message"], reply
        code, reply = gw.call("POST", "dash/api/workers/waiting-box/approve", token=tokens["frank"])
        assert code == 403, reply

        code, reply = gw.call("POST", "dash/api/workers/waiting-box/approve")
        assert code == 200 and reply["state"] == "active" and reply["approved"], reply
        assert policy(gw).machines["waiting-box"] == "active"
        code, reply = agent(gw, token, "POST", "/certificate", {"csr": make_csr()[0]})
        assert code == 200, reply
    finally:
        gw.stop()

    # Same data directory, new process: accounts, machines and tokens are all still there.
    # (A heartbeat timeout longer than any restart: the stored state is what is checked.)
    again = gateway_factory(
        local_workers=0,
        data_dir=gw.data_dir,
        extra=["--DashGateway.worker_heartbeat_timeout=3600"],
    )
    again.wait_for_workers(0)
    try:
        assert again.call("GET", "dash/api/status", token=tokens["frank"])[0] == 200
        record = workers_by_name(again)["waiting-box"]
        assert record["owner"] == "frank" and record["state"] == "active"
        code, beat = agent(again, token, "POST", "/heartbeat", {})
        assert code == 200 and beat["state"] == "active", beat
        assert beat["scheduler"] == again.status()["scheduler"]
    finally:
        again.stop()


def test_offline_is_derived_from_the_heartbeat(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    machine, _ = registry.add_machine("quiet", "operator", {}, {})
    assert machine.effective_state(15) == "active"
    later = machine.created + datetime.timedelta(seconds=16)
    assert machine.effective_state(15, now=later) == "offline"
    assert registry.record_heartbeat("quiet", None).effective_state(15) == "active"
    # Never stored: the policy file and the registry keep "active".
    assert read_policy(tmp_path / "cluster-policy.json").machines == {"quiet": "active"}


# ----- the registry and the CA without a gateway -----------------------------------------


def test_registry_file_is_private_and_versioned(tmp_path: Path) -> None:
    Registry(tmp_path)
    path = tmp_path / "registry.sqlite3"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Registry(tmp_path)  # opening it again changes nothing


def test_an_invite_is_used_once_even_when_raced(tmp_path: Path) -> None:
    registries = [Registry(tmp_path) for _ in range(8)]
    token, _ = registries[0].create_invite("operator", 60)
    outcomes: list[str] = []

    def use(i: int) -> None:
        try:
            registries[i].enrol(token, f"racer-{i}", {}, {}, approve=True)
            outcomes.append("ok")
        except InviteUsedError:
            outcomes.append("used")

    threads = [threading.Thread(target=use, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["ok"] + ["used"] * 7
    assert len(registries[0].machines()) == 1


def test_registry_errors(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    registry.add_machine("one", "operator", {}, {})
    with pytest.raises(AlreadyExistsError):
        registry.add_machine("one", "operator", {}, {})
    with pytest.raises(InvalidInviteError, match="^invalid invite token$"):
        registry.consume_invite("nope", "two")
    pending, _ = registry.add_machine("two", "operator", {}, {}, state="pending")
    with pytest.raises(StateError, match="waiting for an operator"):
        registry.set_state("two", "paused")
    assert registry.approve("two").approved is not None
    registry.revoke_machine("two")
    with pytest.raises(StateError, match="revoked"):
        registry.approve("two")


def test_sign_csr_certifies_only_the_key(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "tls")
    csr, key = make_csr("admin")
    pem, serial = ca.sign_csr(csr, "worker", "box")
    cert = x509.load_pem_x509_certificate(pem.encode())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca.cert_pem.encode()))
    assert cert.serial_number == serial
    assert cert.public_key() == key.public_key()
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "box"
    assert (
        cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "worker"
    )


@pytest.mark.parametrize(
    ("mangle", "error"),
    [
        ("signature", "does not verify"),
        ("weak-rsa", "at least 2048"),
        ("garbage", "not a PEM certificate signing request"),
    ],
)
def test_sign_csr_refuses_bad_requests(tmp_path: Path, mangle: str, error: str) -> None:
    ca = CertificateAuthority(tmp_path / "tls")
    if mangle == "garbage":
        csr_pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    else:
        key: Any = (
            rsa.generate_private_key(65537, 1024)
            if mangle == "weak-rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
            .sign(key, hashes.SHA256())
        )
        der = bytearray(csr.public_bytes(serialization.Encoding.DER))
        if mangle == "signature":
            der[-1] ^= 0x01  # the last byte of the signature
        csr_pem = (
            x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
        )
    with pytest.raises(ValueError, match=error):
        ca.sign_csr(csr_pem, "worker", "box")


def test_tokens_never_look_like_an_option() -> None:
    # `dash-worker join URL --token -abc…` would read the token as an option; with 2,000
    # draws, about 31 plain token_urlsafe values would start with "-".
    from dash_gateway.registry import new_token

    assert not [t for t in (new_token() for _ in range(2000)) if t.startswith("-")]
